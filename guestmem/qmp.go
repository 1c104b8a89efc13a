package guestmem

import (
	"context"

	"github.com/kvmscope/kvmscope/guestmem/qmp"
)

// QMP is a connection to QEMU's QMP socket, the client of guestmem/qmp
// (shared with the test helpers, which cannot import guestmem).
type QMP = qmp.Client

// Monitor is QEMU's monitor as kvmscope uses it: QMP commands, and HMP
// through QMP's human-monitor-command. *QMP speaks it on a QMP socket,
// qmp.Virsh through libvirt (virsh qemu-monitor-command).
type Monitor interface {
	Commands
	Close() error
}

// DialQMP connects to the QMP socket at path (see qmp.Dial).
func DialQMP(ctx context.Context, path string) (*QMP, error) { return qmp.Dial(ctx, path) }
