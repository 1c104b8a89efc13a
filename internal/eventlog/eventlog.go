// Package eventlog appends kvmscope's events to a file of JSON lines, one
// event a line, each with a sequence number that keeps growing across
// restarts, so a reader that remembers the last number it saw loses
// nothing.
//
// An event is {"seq":N,"time":"RFC 3339","kind":"...", ...fields}. The
// file is opened O_APPEND and every event is one write(2), so concurrent
// readers (tail -f, Fluent Bit) never see half a line.
package eventlog

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// Log is an open event log. Its methods are safe for concurrent use.
type Log struct {
	mu   sync.Mutex
	f    *os.File
	seq  uint64
	path string
}

// Open opens (creating with mode perm) the log at path and continues its
// sequence from the last complete line.
func Open(path string, perm os.FileMode) (*Log, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, perm)
	if err != nil {
		return nil, err
	}
	seq, err := lastSeq(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &Log{f: f, seq: seq, path: path}, nil
}

// Path is the file's path.
func (l *Log) Path() string { return l.path }

// lastSeq reads the seq of the last complete line (0 for a new file).
// Only the file's tail is read.
func lastSeq(f *os.File) (uint64, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	const tail = 64 << 10
	off := st.Size() - tail
	if off < 0 {
		off = 0
	}
	b := make([]byte, st.Size()-off)
	if _, err := f.ReadAt(b, off); err != nil && err != io.EOF {
		return 0, err
	}
	var seq uint64
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 4096), tail)
	for sc.Scan() {
		var e struct {
			Seq uint64 `json:"seq"`
		}
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.Seq > seq {
			seq = e.Seq
		}
	}
	return seq, nil
}

// Append writes one event of kind with the fields of v (a struct or map
// that marshals to a JSON object) and returns its sequence number.
func (l *Log) Append(kind string, v any) (uint64, error) {
	body, err := json.Marshal(v)
	if err != nil {
		return 0, err
	}
	if len(body) < 2 || body[0] != '{' {
		return 0, fmt.Errorf("event %s: fields must be a JSON object", kind)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.seq++
	head := fmt.Sprintf(`{"seq":%d,"time":%q,"kind":%q`, l.seq, time.Now().UTC().Format(time.RFC3339Nano), kind)
	line := make([]byte, 0, len(head)+len(body)+2)
	line = append(line, head...)
	if len(body) > 2 {
		line = append(line, ',')
	}
	line = append(line, body[1:]...)
	line = append(line, '\n')
	if _, err := l.f.Write(line); err != nil {
		return 0, fmt.Errorf("event log %s: %w", l.path, err)
	}
	return l.seq, nil
}

// Close closes the file.
func (l *Log) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.Close()
}
