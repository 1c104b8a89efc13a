// Package eventlog appends kvmscope's events to a file of JSON lines, one
// event a line, each with a sequence number that keeps growing across
// restarts, so a reader that remembers the last number it saw loses
// nothing. The file is bounded: past MaxSize it is renamed to PATH.1
// (replacing the one before) and a new one begins, the sequence going on.
//
// An event is {"seq":N,"time":"RFC 3339","kind":"...", ...fields}. The
// file is opened O_APPEND and every event is one write(2), so concurrent
// readers (tail -f, Fluent Bit) never see half a line.
package eventlog

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"sync"
	"time"
)

// Log is an open event log. Its methods are safe for concurrent use.
type Log struct {
	mu        sync.Mutex
	f         *os.File
	seq       uint64
	path      string
	size      int64
	max       int64
	counts    map[string]uint64
	rotations uint64
	changed   chan struct{} // closed and replaced at every append
}

// MaxSize is the size past which a log rotates, unless Open is told
// otherwise (SetMaxSize).
const MaxSize = 16 << 20

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
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &Log{f: f, seq: seq, path: path, size: st.Size(), max: MaxSize, counts: map[string]uint64{}, changed: make(chan struct{})}, nil
}

// SetMaxSize changes the size past which the log rotates.
func (l *Log) SetMaxSize(n int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.max = n
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
	if l.size > 0 && l.size+int64(len(line)) > l.max {
		if err := l.rotate(); err != nil {
			return 0, fmt.Errorf("event log %s: rotate: %w", l.path, err)
		}
	}
	if _, err := l.f.Write(line); err != nil {
		return 0, fmt.Errorf("event log %s: %w", l.path, err)
	}
	l.size += int64(len(line))
	l.counts[kind]++
	close(l.changed)
	l.changed = make(chan struct{})
	return l.seq, nil
}

// rotate moves the file to PATH.1 and starts a new one. Precondition:
// l.mu held.
func (l *Log) rotate() error {
	if err := os.Rename(l.path, l.path+".1"); err != nil {
		return err
	}
	st, err := l.f.Stat()
	if err != nil {
		return err
	}
	f, err := os.OpenFile(l.path, os.O_RDWR|os.O_APPEND|os.O_CREATE|os.O_EXCL, st.Mode().Perm())
	if err != nil {
		return err
	}
	l.f.Close()
	l.f, l.size = f, 0
	l.rotations++
	return nil
}

// Seq is the sequence number of the newest event (0: none yet).
func (l *Log) Seq() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seq
}

// Counts are the events appended since Open, by kind.
func (l *Log) Counts() map[string]uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return maps.Clone(l.counts)
}

// Wait blocks until an event newer than seq exists or ctx ends.
func (l *Log) Wait(ctx context.Context, seq uint64) error {
	for {
		l.mu.Lock()
		cur, ch := l.seq, l.changed
		l.mu.Unlock()
		if cur > seq {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Since returns up to max events with a sequence number above seq, oldest
// first, from the rotated file and the current one, and the oldest
// sequence number the files still hold (0 when empty): a reader whose seq
// is below it has lost the events in between to rotation.
//
// The files are read without the lock, so appends (the tracer's, which
// QEMU waits for) never wait for a reader; a rotation during the read is
// seen by its counter, and the read is done again.
func (l *Log) Since(seq uint64, max int) (events []json.RawMessage, oldest uint64, err error) {
	for {
		l.mu.Lock()
		rot := l.rotations
		l.mu.Unlock()
		events, oldest, err = l.since(seq, max)
		l.mu.Lock()
		again := l.rotations != rot
		l.mu.Unlock()
		if err != nil || !again {
			return events, oldest, err
		}
	}
}

func (l *Log) since(seq uint64, max int) (events []json.RawMessage, oldest uint64, err error) {
	last := seq
	for _, p := range []string{l.path + ".1", l.path} {
		b, err := os.ReadFile(p)
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			return nil, 0, err
		}
		for _, line := range bytes.Split(b, []byte("\n")) {
			var e struct {
				Seq uint64 `json:"seq"`
			}
			if len(line) == 0 || json.Unmarshal(line, &e) != nil || e.Seq == 0 {
				continue
			}
			if oldest == 0 || e.Seq < oldest {
				oldest = e.Seq
			}
			if e.Seq > last && len(events) < max {
				events = append(events, json.RawMessage(append([]byte(nil), line...)))
				last = e.Seq
			}
		}
	}
	return events, oldest, nil
}

// Close closes the file.
func (l *Log) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.Close()
}
