package guestmem

import (
	"context"
	"encoding/json"
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
