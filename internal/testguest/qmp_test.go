package testguest_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/kvmscope/kvmscope/guestmem/qmp"
)

// monitor drives the booted test guest over QMP (guestmem/qmp, which
// imports nothing else of kvmscope's) and reads its memory and registers
// through QEMU alone: pmemsave and memsave files in dir, HMP.
type monitor struct {
	c   *qmp.Client
	dir string
}

// qmpTimeout bounds connecting and each command.
const qmpTimeout = 10 * time.Second

// dialMonitor connects to QEMU's QMP socket at path, waiting while QEMU
// creates it.
func dialMonitor(path, dir string) (*monitor, error) {
	ctx, cancel := context.WithTimeout(context.Background(), qmpTimeout)
	defer cancel()
	c, err := qmp.Dial(ctx, path)
	if err != nil {
		return nil, err
	}
	return &monitor{c: c, dir: dir}, nil
}

func (q *monitor) Close() error { return q.c.Close() }

// do runs one QMP command and returns its "return" value.
func (q *monitor) do(cmd string, args any) (json.RawMessage, error) {
	ctx, cancel := context.WithTimeout(context.Background(), qmpTimeout)
	defer cancel()
	return q.c.Execute(ctx, cmd, args)
}

// hmp runs a human monitor command and returns its text output.
func (q *monitor) hmp(cmdline string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), qmpTimeout)
	defer cancel()
	return q.c.HMP(ctx, cmdline)
}

// physRead reads guest-physical memory with pmemsave (the VM keeps running).
func (q *monitor) physRead(gpa uint64, size int) ([]byte, error) {
	return q.save("pmemsave", map[string]any{"val": gpa, "size": size})
}

// virtRead reads guest-virtual memory through vCPU cpu's page tables.
func (q *monitor) virtRead(cpu int, va uint64, size int) ([]byte, error) {
	// QMP's val is an int64: addresses in the upper half go negative.
	return q.save("memsave", map[string]any{"val": int64(va), "size": size, "cpu-index": cpu})
}

func (q *monitor) save(cmd string, args map[string]any) ([]byte, error) {
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
