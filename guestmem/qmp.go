package guestmem

import (
	"context"

	"github.com/kvmscope/kvmscope/guestmem/qmp"
)

// QMP is a connection to QEMU's QMP socket, the client of guestmem/qmp
// (shared with the test helpers, which cannot import guestmem).
type QMP = qmp.Client

// DialQMP connects to the QMP socket at path (see qmp.Dial).
func DialQMP(ctx context.Context, path string) (*QMP, error) { return qmp.Dial(ctx, path) }
