package guestmem

import (
	"context"
	"encoding/json"
	"fmt"
)

// Commands is what actions inside the guest ask of QEMU's monitor: QMP
// commands and HMP command lines.
type Commands interface {
	Execute(ctx context.Context, cmd string, args any) (json.RawMessage, error)
	HMP(ctx context.Context, cmdline string) (string, error)
}

// Commands is the monitor the source reads QEMU through. Actions inside
// the guest (session.Kill) use it to open QEMU's gdbstub on demand: QEMU
// serves one QMP client per socket, so they cannot dial their own.
func (t *TCG) Commands() Commands { return t.qmp }

// Status is QMP query-status: whether the VM runs, and QEMU's name for
// its state ("running", "paused", ...).
func Status(ctx context.Context, q Commands) (running bool, status string, err error) {
	raw, err := q.Execute(ctx, "query-status", nil)
	if err != nil {
		return false, "", fmt.Errorf("QMP query-status: %w", err)
	}
	var st struct {
		Running bool   `json:"running"`
		Status  string `json:"status"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return false, "", fmt.Errorf("QMP query-status: %w", err)
	}
	return st.Running, st.Status, nil
}
