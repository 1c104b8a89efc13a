//go:build linux && amd64

package guestmem

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testguest"
	"github.com/kvmscope/kvmscope/internal/tracetest"
	"github.com/kvmscope/kvmscope/tracer"
)

// The live tests trace QEMU from the test process (internal/tracetest).
func init() { tracetest.Child() }

// liveGuest is the tiny test guest under an in-process tracer.
//
// While one runs, the test process must start no other child: the tracer's
// waitpid(-1) would reap it.
type liveGuest struct {
	tr      *tracer.Tracer
	live    *Live
	qmp     *QMP
	stopped sync.Once
}

// guestOptions choose how startLiveGuest runs the tiny guest.
type guestOptions struct {
	memfd   bool   // guest RAM from memory-backend-memfd
	cmdline string // the guest's command line ("" spins)
	opts    tracer.Options
}

// needKVMGuest runs the test only where QEMU and KVM are (the gate defers
// it to the nested-KVM lab otherwise) and returns the QEMU binary and the
// built tiny guest.
func needKVMGuest(tb testing.TB) (qemu, kernel string) {
	tb.Helper()
	testenv.Require(tb, testenv.QEMU, testenv.KVM)
	qemu, _ = exec.LookPath("qemu-system-x86_64")
	kernel, err := testguest.Build()
	if err != nil {
		tb.Fatalf("build tiny guest: %v", err)
	}
	return qemu, kernel
}

// startLiveGuest boots the tiny guest under the tracer with a QMP socket,
// waits until it is in long mode with its patterns written, and stops it at
// the end of the test.
func startLiveGuest(tb testing.TB, o guestOptions) *liveGuest {
	tb.Helper()
	qemu, kernel := needKVMGuest(tb)
	qmpPath := filepath.Join(tb.TempDir(), "qmp.sock")
	args := testguest.KernelArgs(kernel, 1, "kvm", o.cmdline)
	if o.memfd {
		args = withMemfdRAM(args)
	}
	args = append(args, "-qmp", "unix:"+qmpPath+",server=on,wait=off")
	tr, err := tracetest.Start(qemu, append([]string{qemu}, args...), o.opts)
	if err != nil {
		tb.Fatalf("start QEMU under the tracer: %v", err)
	}
	g := &liveGuest{tr: tr, live: NewLive(tr.VM(), true)}
	tb.Cleanup(func() { g.stop(tb) })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if g.qmp, err = DialQMP(ctx, qmpPath); err != nil {
		tb.Fatal(err)
	}
	for {
		var b [8]byte
		if _, err := g.live.ReadAt(b[:], testguest.ReadyGPA); err == nil && binary.LittleEndian.Uint64(b[:]) == testguest.ReadyValue {
			break
		}
		select {
		case <-ctx.Done():
			tb.Fatalf("the tiny guest did not get ready: %v", ctx.Err())
		case <-tr.Done():
			tb.Fatalf("QEMU exited before the guest got ready (status %d)", tracer.ExitCode(tr.ExitStatus()))
		case <-time.After(10 * time.Millisecond):
		}
	}
	return g
}

// withMemfdRAM makes QEMU back guest RAM with a memfd:
// -object memory-backend-memfd and -machine memory-backend= (QEMU >= 5.0).
func withMemfdRAM(args []string) []string {
	out := make([]string, 0, len(args)+2)
	for i := 0; i < len(args); i++ {
		out = append(out, args[i])
		if args[i] == "-machine" && i+1 < len(args) {
			i++
			out = append(out, args[i]+",memory-backend=guestram")
		}
	}
	return append(out, "-object", fmt.Sprintf("memory-backend-memfd,id=guestram,size=%dM", testguest.MemoryMiB))
}

// stop ends QEMU and waits until the tracer has no task left, so that
// another guest may be started. Calling it again does nothing.
func (g *liveGuest) stop(tb testing.TB) {
	g.stopped.Do(func() {
		g.live.Close()
		if g.qmp != nil {
			g.qmp.Close()
		}
		g.tr.Signal(syscall.SIGTERM)
		select {
		case <-g.tr.Done():
		case <-time.After(20 * time.Second):
			tb.Errorf("QEMU ignored SIGTERM for 20 s; killing it")
			g.tr.Signal(syscall.SIGKILL)
			<-g.tr.Done()
		}
	})
}

// ramRange is guest RAM above 1 MiB, one slot with the tiny guest's 64 MiB.
const (
	ramLo = 0x100000
	ramHi = testguest.MemoryMiB << 20
)

func TestLiveMemfd(t *testing.T) {
	g := startLiveGuest(t, guestOptions{memfd: true})
	l := g.live

	regs, err := l.MemfdRegions()
	if err != nil {
		t.Fatalf("MemfdRegions: %v", err)
	}
	covers := func(lo, hi uint64) bool {
		for _, r := range regs {
			if r.GPA <= lo && hi <= r.GPA+r.Size {
				return true
			}
		}
		return false
	}
	if !covers(0, 0xa0000) || !covers(ramLo, ramHi) {
		t.Fatalf("memfd-mapped regions %+v do not cover guest RAM (slots %+v)", regs, l.slots())
	}
	for _, r := range regs {
		if r.Name != "memfd:guestram" && r.Name != "memfd:memory-backend-memfd" {
			t.Errorf("region %+v: want the memfd's name", r)
		}
	}

	// The pattern pages read back through the mapping.
	for i := 0; i < testguest.PatternPages; i++ {
		b := make([]byte, testguest.PageSize)
		if _, err := l.ReadAt(b, int64(testguest.PatternGPA+i*testguest.PageSize)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, testguest.PatternFor(i)) {
			t.Fatalf("pattern page %d through the memfd mapping = %q...", i, b[:32])
		}
	}

	// The mapping is live, not a copy: the guest's counter advances in it.
	c0 := readU64(t, l, testguest.CounterGPA)
	deadline := time.Now().Add(10 * time.Second)
	for readU64(t, l, testguest.CounterGPA) == c0 {
		if time.Now().After(deadline) {
			t.Fatalf("counter stuck at %d in the memfd mapping", c0)
		}
		time.Sleep(5 * time.Millisecond)
	}

	// What QEMU writes (process_vm_writev into its own mapping) shows in
	// ours, and both read paths agree over all of RAM above 1 MiB except
	// the status page, where the counter moves.
	buf := make([]byte, 4<<20)
	rand.New(rand.NewSource(1)).Read(buf)
	const at = 16 << 20
	if _, err := l.WriteAt(buf, at); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(buf))
	if _, err := l.ReadAt(got, at); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("read back of a 4 MiB write through the mapping differs (err %v)", err)
	}
	viaMap := make([]byte, ramHi-ramLo)
	viaProc := make([]byte, ramHi-ramLo)
	if _, err := l.ReadAt(viaMap, ramLo); err != nil {
		t.Fatal(err)
	}
	if _, err := readRanges(g.tr.VM().Pid(), l.slots(), viaProc, ramLo); err != nil {
		t.Fatal(err)
	}
	status := testguest.StatusGPA - ramLo
	clear(viaMap[status : status+testguest.PageSize])
	clear(viaProc[status : status+testguest.PageSize])
	if !bytes.Equal(viaMap, viaProc) {
		t.Fatal("memfd mapping and process_vm_readv disagree on guest RAM")
	}

	// Reads crossing from a mapped slot into a hole and out of RAM fail
	// like process_vm_readv's path does.
	var he *HoleError
	if _, err := l.ReadAt(make([]byte, 16), ramHi-8); !errors.As(err, &he) || he.GPA != ramHi {
		t.Errorf("read across the end of RAM: err %v, want a hole at %#x", err, ramHi)
	}
}

// Readers copying from the mappings while the slot table keeps changing
// (QEMU changes memslots all through boot): a refresh must never unmap a
// range a reader is copying from. Run with -race too.
func TestMemfdRefreshWhileReading(t *testing.T) {
	g := startLiveGuest(t, guestOptions{memfd: true})
	pid, rs := g.tr.VM().Pid(), g.live.slots()
	// A second table in which the slot holding the pattern pages runs
	// 4 KiB past the end of QEMU's memfd mapping: no mapping holds it, so
	// it is read with process_vm_readv (same bytes), and every switch
	// between the tables unmaps or maps the memfd again.
	rs2 := append([]procRange(nil), rs...)
	i, ok := findRangeIndex(rs2, testguest.PatternGPA)
	if !ok {
		t.Fatalf("no slot holds %#x: %+v", testguest.PatternGPA, rs)
	}
	rs2[i].Size += testguest.PageSize
	var m memfdRAM
	defer m.close()
	const readers, rounds = 4, 200
	errc := make(chan error, readers)
	for w := 0; w < readers; w++ {
		go func(w int) {
			b := make([]byte, testguest.PatternPages*testguest.PageSize)
			for i := 0; i < rounds; i++ {
				table := rs
				if (i+w)%2 == 1 {
					table = rs2
				}
				if _, err := m.readAt(pid, table, b, testguest.PatternGPA); err != nil {
					errc <- err
					return
				}
				for p := 0; p < testguest.PatternPages; p++ {
					if !bytes.Equal(b[p*testguest.PageSize:(p+1)*testguest.PageSize], testguest.PatternFor(p)) {
						errc <- fmt.Errorf("reader %d round %d: pattern page %d differs", w, i, p)
						return
					}
				}
			}
			errc <- nil
		}(w)
	}
	for w := 0; w < readers; w++ {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	if n := m.faults.Load(); n != 0 {
		t.Fatalf("%d copies faulted: a mapping was unmapped under a reader", n)
	}
	if regs, err := m.regions(pid, rs); err != nil || len(regs) == 0 {
		t.Fatalf("after the churn: memfd regions %+v, %v", regs, err)
	}
}

func TestLiveAnonymousRAMIsNotMapped(t *testing.T) {
	g := startLiveGuest(t, guestOptions{})
	regs, err := g.live.MemfdRegions()
	if err != nil || len(regs) != 0 {
		t.Fatalf("MemfdRegions on anonymous guest RAM = %+v, %v; want none", regs, err)
	}
	b := make([]byte, testguest.PageSize)
	if _, err := g.live.ReadAt(b, testguest.PatternGPA); err != nil || !bytes.Equal(b, testguest.PatternFor(0)) {
		t.Fatalf("pattern page 0 through process_vm_readv = %q..., %v", b[:32], err)
	}
}

func readU64(t *testing.T, m Memory, gpa uint64) uint64 {
	t.Helper()
	var b [8]byte
	if _, err := m.ReadAt(b[:], int64(gpa)); err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint64(b[:])
}

// testMemfd is a memfd of size bytes mapped as mapMemfd maps QEMU's, with
// want written at offset at (the rest holes), as one view.
func testMemfd(t *testing.T, size int, at int64, want []byte) (memfdView, int) {
	t.Helper()
	fd, err := unix.MemfdCreate("kvmscope-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Skipf("memfd_create: %v", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Pwrite(fd, want, at); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(fd, 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	f := &memfdFile{mem: mem, fd: fd, present: make([]atomic.Uint64, (size/pageSize+63)/64)}
	t.Cleanup(f.unmap)
	return memfdView{data: mem, file: f}, fd
}

// TestMemfdReadAllocatesNothing: reading all of a memfd that is mostly
// holes, as a scan reads guest RAM, returns the data and zeros for the
// holes, and allocates no page (a read fault on a hole of a shared
// mapping would allocate it: the guest's RAM would grow on the host).
func TestMemfdReadAllocatesNothing(t *testing.T) {
	const size = 16 << 20
	want := []byte("kvmscope")
	v, fd := testMemfd(t, size, 5*pageSize+100, want)
	blocks := func() int64 {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks
	}
	before := blocks()
	all := make([]byte, size)
	for i := 0; i < 2; i++ { // the second time from what the first learnt
		if err := copyMapped(v, all, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(all[5*pageSize+100:5*pageSize+100+len(want)], want) {
			t.Fatalf("read %q, want %q", all[5*pageSize+100:5*pageSize+108], want)
		}
		if n := bytes.Count(all, []byte{0}); n != size-len(want) {
			t.Fatalf("%d zero bytes, want %d", n, size-len(want))
		}
	}
	if after := blocks(); after != before {
		t.Errorf("reading allocated the memfd: %d blocks before, %d after", before, after)
	}
	if !v.file.has(5) || v.file.has(6) {
		t.Error("page 5 (written) not known present, or page 6 (a hole) taken for one")
	}
}

// A memfd truncated under our mapping raises SIGBUS on access; copyMapped
// must turn that into an error.
func TestCopyMappedFault(t *testing.T) {
	v, fd := testMemfd(t, 2*4096, 0, bytes.Repeat([]byte{1}, 2*4096))
	dst := make([]byte, 2*4096)
	if err := copyMapped(v, dst, 0); err != nil {
		t.Fatalf("copy before truncation: %v", err)
	}
	if err := unix.Ftruncate(fd, 0); err != nil {
		t.Fatal(err)
	}
	if err := copyMapped(v, dst, 0); err == nil {
		t.Fatal("copy from a truncated memfd succeeded; want a fault error")
	}
}

const sampleMaps = `55d0c6a00000-55d0c6a27000 r--p 00000000 fe:01 1312845                    /usr/bin/qemu-system-x86_64
7f1ef41fe000-7f1ef81fe000 rw-s 00000000 00:01 94                         /memfd:memory-backend-memfd (deleted)
7f1ef81fe000-7f1ef83fe000 rw-p 00000000 00:00 0 
7f1ef8400000-7f1ef8600000 rw-s 00200000 00:01 95                         /memfd:with space name (deleted)
7ffd2b3b1000-7ffd2b3d2000 rw-p 00000000 00:00 0                          [stack]
`

func TestParseProcMaps(t *testing.T) {
	ms, err := parseProcMaps(strings.NewReader(sampleMaps))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 5 {
		t.Fatalf("got %d mappings: %+v", len(ms), ms)
	}
	want := procMapping{Start: 0x7f1ef41fe000, End: 0x7f1ef81fe000, Perms: "rw-s", Major: 0, Minor: 1, Inode: 94, Path: "/memfd:memory-backend-memfd (deleted)"}
	if ms[1] != want || !ms[1].isSharedMemfd() {
		t.Errorf("memfd line = %+v, want %+v", ms[1], want)
	}
	if ms[2].Path != "" || ms[2].isSharedMemfd() {
		t.Errorf("anonymous line = %+v", ms[2])
	}
	if ms[3].Offset != 0x200000 || ms[3].Path != "/memfd:with space name (deleted)" || ms[0].Major != 0xfe {
		t.Errorf("lines = %+v", ms)
	}
	if m, ok := findMapping(ms, 0x7f1ef41fe000+0x100000, 0x3f00000); !ok || m != want {
		t.Errorf("findMapping inside = %+v, %v", m, ok)
	}
	if _, ok := findMapping(ms, 0x7f1ef41fe000+0x100000, 0x4000000); ok {
		t.Error("findMapping accepted a range running past the mapping")
	}
	if _, ok := findMapping(ms, 0x1000, 0x1000); ok {
		t.Error("findMapping found an unmapped address")
	}

	// Our own maps parse, and every line comes back.
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	own, err := parseProcMaps(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("parse /proc/self/maps: %v", err)
	}
	if n := bytes.Count(b, []byte("\n")); len(own) != n {
		t.Errorf("parsed %d of %d lines of /proc/self/maps", len(own), n)
	}

	for _, bad := range []string{"zz-1 rw-p 0 0:0 0", "2-1 rw-p 0 0:0 0", "1-2 rw 0 0:0 0", "1-2 rw-p 0 00 0", "1-2 rw-p 0 0:0 x", "1-2 rw-p q 0:0 0", strings.Repeat("a", maxMapsLine+1)} {
		if _, err := parseProcMaps(strings.NewReader(bad + "\n")); err == nil {
			t.Errorf("parseProcMaps(%.40q) accepted a bad line", bad)
		}
	}
}

func FuzzParseProcMaps(f *testing.F) {
	f.Add(sampleMaps)
	f.Add("1-2 rw-s 0 0:1 7 /memfd:x (deleted)\n")
	f.Add("ffffffffffffffff-0 ---- 0 :  ")
	f.Fuzz(func(t *testing.T, s string) {
		ms, err := parseProcMaps(strings.NewReader(s))
		if err != nil {
			return
		}
		for _, m := range ms {
			if m.End < m.Start {
				t.Fatalf("mapping %+v ends before it starts", m)
			}
			if got, ok := findMapping(ms, m.Start, m.End-m.Start); ok && (got.Start > m.Start || got.End < m.End) {
				t.Fatalf("findMapping(%+v) = %+v", m, got)
			}
		}
	})
}

// TestEntryMSRs: the vCPUs' LSTAR, read with KVM_GET_MSRS run as QEMU on
// each vCPU's thread (the tracer's system-call injection), is what the
// guest wrote, and the guest runs on.
func TestEntryMSRs(t *testing.T) {
	g := startLiveGuest(t, guestOptions{})
	l := g.live
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := l.ReadEntryMSRs(ctx); err != nil {
		t.Fatal(err)
	}
	cpus, err := l.CPUs(ctx)
	if err != nil || len(cpus) == 0 {
		t.Fatalf("CPUs: %v, %v", cpus, err)
	}
	for _, c := range cpus {
		if c.Entry == nil || c.Entry.LSTAR != testguest.LSTARValue {
			t.Errorf("vCPU %d: entry MSRs %+v, want LSTAR %#x", c.ID, c.Entry, uint64(testguest.LSTARValue))
		}
	}
	c0 := readU64(t, l, testguest.CounterGPA)
	deadline := time.Now().Add(10 * time.Second)
	for readU64(t, l, testguest.CounterGPA) == c0 {
		if time.Now().After(deadline) {
			t.Fatal("the guest stopped running after the injected KVM_GET_MSRS")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
