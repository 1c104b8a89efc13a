package testlinux

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"sync"
	"time"
)

// qmpClient is a minimal QEMU Machine Protocol client: one command at a
// time, asynchronous events skipped (docs/interop/qmp-spec.rst in QEMU).
type qmpClient struct {
	mu   sync.Mutex
	conn net.Conn
	r    *bufio.Reader
	id   int
}

// dialQMP connects to a QMP unix socket and leaves capabilities
// negotiation mode.
func dialQMP(path string, timeout time.Duration) (*qmpClient, error) {
	deadline := time.Now().Add(timeout)
	var conn net.Conn
	var err error
	for {
		conn, err = net.Dial("unix", path)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("connect QMP socket %s: %w", path, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	c := &qmpClient{conn: conn, r: bufio.NewReaderSize(conn, 64<<10)}
	// The greeting: {"QMP": {...}}.
	conn.SetDeadline(time.Now().Add(timeout))
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	line, err := c.r.ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &greeting)
	}
	if err != nil || greeting.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("QMP greeting on %s: %q: %v", path, line, err)
	}
	conn.SetDeadline(time.Time{})
	if _, err := c.execute("qmp_capabilities", nil, timeout); err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

type qmpError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// execute runs one command and returns its "return" value.
func (c *qmpClient) execute(cmd string, args any, timeout time.Duration) (json.RawMessage, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.id++
	req := map[string]any{"execute": cmd, "id": c.id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("QMP %s: encode arguments: %w", cmd, err)
	}
	c.conn.SetDeadline(time.Now().Add(timeout))
	defer c.conn.SetDeadline(time.Time{})
	if _, err := c.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		line, err := c.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("QMP %s: read reply: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *qmpError       `json:"error"`
			Event  string          `json:"event"`
			ID     int             `json:"id"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("QMP %s: bad reply %q: %w", cmd, line, err)
		}
		if resp.Event != "" || resp.ID != c.id {
			continue
		}
		if resp.Error != nil {
			return nil, fmt.Errorf("QMP %s: %s: %s", cmd, resp.Error.Class, resp.Error.Desc)
		}
		return resp.Return, nil
	}
}

func (c *qmpClient) close() error { return c.conn.Close() }
