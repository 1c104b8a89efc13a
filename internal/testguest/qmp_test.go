package testguest_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"
)

// qmp is a minimal QMP client, enough to read guest memory and registers of
// the booted test guest without any kvmscope code.
type qmp struct {
	conn net.Conn
	dec  *json.Decoder
	enc  *json.Encoder
	dir  string // for pmemsave/memsave output files
}

// dialQMP connects to QEMU's QMP socket at path, retrying until deadline
// while QEMU creates it, and leaves capabilities negotiation mode.
func dialQMP(path, dir string, deadline time.Time) (*qmp, error) {
	var conn net.Conn
	var err error
	for {
		conn, err = net.Dial("unix", path)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("connect QMP %s: %w", path, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	q := &qmp{conn: conn, dec: json.NewDecoder(conn), enc: json.NewEncoder(conn), dir: dir}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	var greeting struct {
		QMP json.RawMessage `json:"QMP"`
	}
	if err := q.dec.Decode(&greeting); err != nil || greeting.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("QMP greeting: %v", err)
	}
	if _, err := q.do("qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmp) Close() error { return q.conn.Close() }

// do runs one QMP command and returns its "return" value, skipping events.
func (q *qmp) do(cmd string, args any) (json.RawMessage, error) {
	q.conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	if err := q.enc.Encode(req); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := q.dec.Decode(&resp); err != nil {
			return nil, fmt.Errorf("QMP %s: %w", cmd, err)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			return nil, fmt.Errorf("QMP %s: %s: %s", cmd, resp.Error.Class, resp.Error.Desc)
		default:
			return resp.Return, nil
		}
	}
}

// hmp runs a human monitor command and returns its text output.
func (q *qmp) hmp(cmdline string) (string, error) {
	r, err := q.do("human-monitor-command", map[string]any{"command-line": cmdline})
	if err != nil {
		return "", err
	}
	var s string
	if err := json.Unmarshal(r, &s); err != nil {
		return "", fmt.Errorf("HMP %q: %w", cmdline, err)
	}
	return s, nil
}

// physRead reads guest-physical memory with pmemsave (the VM keeps running).
func (q *qmp) physRead(gpa uint64, size int) ([]byte, error) {
	return q.save("pmemsave", map[string]any{"val": gpa, "size": size})
}

// virtRead reads guest-virtual memory through vCPU cpu's page tables.
func (q *qmp) virtRead(cpu int, va uint64, size int) ([]byte, error) {
	// QMP's val is an int64: addresses in the upper half go negative.
	return q.save("memsave", map[string]any{"val": int64(va), "size": size, "cpu-index": cpu})
}

func (q *qmp) save(cmd string, args map[string]any) ([]byte, error) {
	f, err := os.CreateTemp(q.dir, cmd+"-*")
	if err != nil {
		return nil, err
	}
	name := f.Name()
	f.Close()
	defer os.Remove(name)
	args["filename"] = name
	if _, err := q.do(cmd, args); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	if size, _ := args["size"].(int); len(b) != size {
		return nil, errors.New(cmd + ": short file " + filepath.Base(name))
	}
	return b, nil
}
