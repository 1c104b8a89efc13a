// Package qmp is a minimal client for QEMU's machine protocol on a unix
// socket (docs/interop/qmp-spec.rst in QEMU). It imports nothing of
// kvmscope's, so that guestmem and the test helpers guestmem's own tests
// import (internal/testlinux) can share it without an import cycle.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// Client is a connection to one QMP socket. Commands are serialized;
// events are skipped.
type Client struct {
	mu   sync.Mutex
	conn net.Conn
	r    *bufio.Reader
}

// Dial connects to the QMP socket at path and negotiates capabilities,
// retrying until ctx ends (QEMU creates the socket some time after start).
func Dial(ctx context.Context, path string) (*Client, error) {
	var conn net.Conn
	var err error
	for {
		var d net.Dialer
		conn, err = d.DialContext(ctx, "unix", path)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to QMP at %s: %w", path, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	q := &Client{conn: conn, r: bufio.NewReaderSize(conn, 1<<16)}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	// Greeting, then leave negotiation mode.
	if _, err := q.readReply(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("QMP greeting: %w", err)
	}
	conn.SetDeadline(time.Time{})
	if _, err := q.Execute(ctx, "qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

// qmpMessage is any message from QEMU.
type qmpMessage struct {
	QMP    json.RawMessage `json:"QMP"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event string `json:"event"`
}

// maxQMPLine bounds one message from QEMU.
const maxQMPLine = 64 << 20

func (q *Client) readReply() (json.RawMessage, error) {
	for {
		line, err := q.r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			buf := append([]byte(nil), line...)
			for errors.Is(err, bufio.ErrBufferFull) && len(buf) < maxQMPLine {
				line, err = q.r.ReadSlice('\n')
				buf = append(buf, line...)
			}
			line = buf
		}
		if err != nil {
			return nil, fmt.Errorf("read from QMP: %w", err)
		}
		var m qmpMessage
		if err := json.Unmarshal(line, &m); err != nil {
			return nil, fmt.Errorf("bad QMP message: %w", err)
		}
		switch {
		case m.Event != "":
			continue
		case m.Error != nil:
			return nil, fmt.Errorf("QMP: %s: %s", m.Error.Class, m.Error.Desc)
		case m.QMP != nil:
			return m.QMP, nil
		default:
			return m.Return, nil
		}
	}
}

// Execute runs a QMP command and returns its "return" value.
func (q *Client) Execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	b, err := command(cmd, args)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		q.conn.SetDeadline(dl)
		defer q.conn.SetDeadline(time.Time{})
	}
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	ret, err := q.readReply()
	if err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	return ret, nil
}

// command is the JSON of a QMP command.
func command(cmd string, args any) ([]byte, error) {
	msg := map[string]any{"execute": cmd}
	if args != nil {
		msg["arguments"] = args
	}
	return json.Marshal(msg)
}

// HMP runs a human monitor command and returns its text output.
func (q *Client) HMP(ctx context.Context, cmdline string) (string, error) {
	ret, err := q.Execute(ctx, "human-monitor-command", map[string]string{"command-line": cmdline})
	if err != nil {
		return "", err
	}
	var s string
	if err := json.Unmarshal(ret, &s); err != nil {
		return "", fmt.Errorf("HMP %q: %w", cmdline, err)
	}
	return s, nil
}

// Close closes the connection.
func (q *Client) Close() error { return q.conn.Close() }
