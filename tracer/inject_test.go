//go:build linux && amd64

package tracer

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestInject runs system calls as a traced process that waits in pause()
// with a SIGUSR1 handler, as QEMU's threads wait in KVM_RUN: the results
// are the process's own, a buffer comes back filled, and the process goes
// on as if it had only been kicked.
func TestInject(t *testing.T) {
	tr, sc := startTraced(t, nil, nil, "serve")
	if !sc.Scan() || sc.Text() != "serving" {
		t.Fatalf("no serving line: %q", sc.Text())
	}
	pid := tr.Pid()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	got, err := tr.inject(ctx, pid, pid, Syscall{NR: unix.SYS_GETPID})
	if err != nil || got != int64(pid) {
		t.Errorf("injected getpid = %d, %v; want %d", got, err, pid)
	}

	buf := make([]byte, 390) // struct utsname
	if _, err := tr.inject(ctx, pid, pid, Syscall{NR: unix.SYS_UNAME, Buf: buf, BufArg: 0}); err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(buf, []byte("Linux\x00")) {
		t.Errorf("injected uname wrote %q", buf[:16])
	}
	// A failing call returns its errno; the process survives it.
	if _, err := tr.inject(ctx, pid, pid, Syscall{NR: unix.SYS_IOCTL, Args: [6]uint64{999, 0x5401}}); err != unix.EBADF {
		t.Errorf("ioctl on a closed fd: %v, want EBADF", err)
	}
	// The process goes on: the kicks were handled as kicks (the
	// handler ran; pause, if it had been reached, returned EINTR), and a
	// kick now still wakes it.
	time.Sleep(50 * time.Millisecond)
	unix.Kill(pid, unix.SIGUSR1)
	for sc.Scan() {
		if sc.Text() == "woke -1 4" {
			break
		}
		if !strings.HasPrefix(sc.Text(), "woke -1 4") {
			t.Fatalf("the process printed %q", sc.Text())
		}
	}
	if _, err := tr.inject(ctx, pid, pid, Syscall{NR: unix.SYS_GETPID, Buf: make([]byte, maxInjectBuf+1)}); err == nil {
		t.Error("a buffer above the limit was accepted")
	}
}
