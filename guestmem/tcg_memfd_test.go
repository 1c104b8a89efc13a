package guestmem

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// TestTCGMemfd boots Debian under TCG with its RAM in a memfd
// (-object memory-backend-memfd) and checks that the TCG source serves RAM
// from its own mapping, with the same bytes process_vm_readv reads from
// QEMU, including memory the running guest changes; and that with QEMU's
// default anonymous RAM nothing is mapped.
func TestTCGMemfd(t *testing.T) {
	p := testlinux.Require(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const memMB = 256
	g, err := testlinux.Boot(ctx, testlinux.Options{
		Kernel: p.DebianKernel, MemMB: memMB, SMP: 1,
		ExtraArgs: []string{"-object", "memory-backend-memfd,id=guestram,size=256M", "-machine", "memory-backend=guestram"},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	q, err := DialQMP(ctx, g.SpareQMP())
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	src := NewTCG(q, g.Pid, false)
	defer src.Close()
	mapped, err := src.MemfdRegions()
	if err != nil {
		t.Fatalf("MemfdRegions: %v", err)
	}
	var n uint64
	for _, r := range mapped {
		n += r.Size
	}
	// All RAM but the holes the PC machine punches (VGA window, BIOS).
	if n < (memMB-1)<<20 {
		t.Fatalf("memfd-mapped guest RAM: %d MiB in %+v; want about %d MiB", n>>20, mapped, memMB)
	}
	rs, err := src.memoryMap(false)
	if err != nil {
		t.Fatal(err)
	}
	// The same bytes both ways, on pages spread over RAM. The guest
	// runs on (a timer tick may change a page between the two reads), so
	// a page may differ once but not on a retry.
	mismatch := 0
	for gpa := int64(1 << 20); gpa < int64(memMB-1)<<20; gpa += 7<<20 + 4096 {
		a, b := make([]byte, 8192), make([]byte, 8192)
		same := false
		for try := 0; try < 3 && !same; try++ {
			if _, err := src.ReadAt(a, gpa); err != nil {
				t.Fatalf("ReadAt %#x: %v", gpa, err)
			}
			if _, err := ioRanges(g.Pid(), rs, b, gpa, false); err != nil {
				t.Fatalf("process_vm_readv %#x: %v", gpa, err)
			}
			same = bytes.Equal(a, b)
		}
		if !same {
			mismatch++
			t.Errorf("guest physical %#x: memfd mapping and process_vm_readv differ", gpa)
		}
	}
	// The guest's own writes are visible through the mapping: the
	// kernel's jiffies-driven data changes while it idles; find a page
	// that differs between two reads a second apart.
	buf1, buf2 := make([]byte, (memMB-2)<<20), make([]byte, (memMB-2)<<20)
	if _, err := src.ReadAt(buf1, 1<<20); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if _, err := src.ReadAt(buf2, 1<<20); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(buf1, buf2) {
		t.Error("guest RAM read through the memfd mapping did not change in a second of a running guest")
	}
	if f := src.memfd.faults.Load(); f != 0 {
		t.Errorf("%d copies from the mapping faulted", f)
	}

	// Anonymous RAM (QEMU's default; a stopped QEMU without a guest
	// suffices): nothing mapped, reads still work.
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	qmpPath := filepath.Join(t.TempDir(), "qmp.sock")
	cmd := exec.Command(qemu, "-accel", "tcg", "-m", "64", "-S", "-nodefaults", "-display", "none",
		"-qmp", "unix:"+qmpPath+",server=on,wait=off")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	q2, err := DialQMP(ctx, qmpPath)
	if err != nil {
		t.Fatal(err)
	}
	defer q2.Close()
	src2 := NewTCG(q2, func() int { return cmd.Process.Pid }, false)
	defer src2.Close()
	if m, err := src2.MemfdRegions(); len(m) != 0 || err != nil {
		t.Errorf("anonymous RAM: memfd regions %+v, %v; want none", m, err)
	}
	var b [4096]byte
	if _, err := src2.ReadAt(b[:], 1<<20); err != nil {
		t.Errorf("anonymous RAM: %v", err)
	}
}
