package guestmem

// Monitor is the QMP connection the source reads QEMU through. Actions
// inside the guest (session.Kill) use it to open QEMU's gdbstub on demand:
// QEMU serves one QMP client per socket, so they cannot dial their own.
func (t *TCG) Monitor() *QMP { return t.qmp }
