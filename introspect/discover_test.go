package introspect

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// These tests boot the real test kernels under QEMU (TCG, KASLR on),
// stop them, and check what Discover finds in guest memory against the
// guest's own /proc/kallsyms (printed by its /init) and QEMU's own view
// of the guest's page tables (HMP gva2gpa).

// discoverGuest is one booted, stopped guest and its memory dump.
type discoverGuest struct {
	levels int  // paging levels the guest runs with
	kaslr  bool // booted with KASLR
	g      *testlinux.Guest
	core   *guestmem.Core
	cpus   []guestmem.CPU
}

func bootForDiscover(t *testing.T, kernel func(testlinux.Paths) string, qemuArgs []string, cmdline string) *discoverGuest {
	t.Helper()
	p := testlinux.Require(t)
	g, err := testlinux.Boot(context.Background(), testlinux.Options{Kernel: kernel(p), ExtraArgs: qemuArgs, Append: cmdline, Timeout: 180 * time.Second})
	if err != nil {
		t.Fatalf("boot %s: %v", kernel(p), err)
	}
	t.Cleanup(func() { g.Close() })
	t.Logf("booted %s in %v", g.Release(), g.BootTime())
	if _, err := g.QMP("stop", nil); err != nil {
		t.Fatalf("QMP stop: %v", err)
	}
	path := filepath.Join(t.TempDir(), "guest.core")
	if err := g.Dump(path); err != nil {
		t.Fatalf("dump: %v", err)
	}
	core, err := guestmem.OpenCore(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { core.Close() })
	cpus, err := core.CPUs(context.Background())
	if err != nil {
		t.Fatalf("CPUs from core: %v", err)
	}
	levels := 4
	for _, a := range qemuArgs {
		if strings.Contains(a, "la57") {
			levels = 5
		}
	}
	return &discoverGuest{levels: levels, kaslr: !strings.Contains(cmdline, "nokaslr"), g: g, core: core, cpus: cpus}
}

var gpaRe = regexp.MustCompile(`gpa:\s*(0x[0-9a-fA-F]+|[0-9]+)`)

// gva2gpa asks QEMU to translate a guest virtual address with the
// guest's current page tables.
func (d *discoverGuest) gva2gpa(t *testing.T, va uint64) uint64 {
	t.Helper()
	out, err := d.g.HMP(fmt.Sprintf("gva2gpa %#x", va))
	if err != nil {
		t.Fatalf("gva2gpa %#x: %v", va, err)
	}
	m := gpaRe.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("gva2gpa %#x: %q", va, out)
	}
	pa, err := strconv.ParseUint(m[1], 0, 64)
	if err != nil {
		t.Fatal(err)
	}
	return pa
}

// checkKernel compares a discovered kernel with the guest's own view.
func checkKernel(t *testing.T, d *discoverGuest, k *Kernel, wantBTF bool) {
	t.Helper()
	truth := d.g.Kallsyms()
	text, ok := truth["_text"]
	if !ok {
		t.Fatal("guest printed no _text")
	}
	if k.TextVA != text {
		t.Errorf("TextVA = %#x, guest says %#x", k.TextVA, text)
	}
	if k.KASLRShift != int64(text-defaultTextVA) {
		t.Errorf("KASLRShift = %#x", k.KASLRShift)
	}
	if !d.kaslr && (k.KASLRShift != 0 || k.PageOffsetBase != defaultBases[k.Levels][0]) {
		t.Errorf("nokaslr: shift %#x, page_offset_base %#x", k.KASLRShift, k.PageOffsetBase)
	}
	if pa := d.gva2gpa(t, text); k.PhysBase != pa {
		t.Errorf("PhysBase = %#x, QEMU translates _text to %#x", k.PhysBase, pa)
	}
	if pa := d.gva2gpa(t, k.PageOffsetBase); pa != 0 {
		t.Errorf("page_offset_base %#x maps %#x, want 0", k.PageOffsetBase, pa)
	}
	for _, name := range []string{"page_offset_base", "vmalloc_base", "vmemmap_base"} {
		va, ok := truth[name]
		if !ok {
			continue
		}
		out, err := d.g.HMP(fmt.Sprintf("x /1gx %#x", va))
		if err != nil {
			t.Fatal(err)
		}
		f := strings.Fields(out)
		want, err := strconv.ParseUint(f[len(f)-1], 0, 64)
		if err != nil {
			t.Fatalf("x %s: %q", name, out)
		}
		got := map[string]uint64{"page_offset_base": k.PageOffsetBase, "vmalloc_base": k.VmallocBase, "vmemmap_base": k.VmemmapBase}[name]
		if got != want {
			t.Errorf("%s = %#x, guest memory says %#x", name, got, want)
		}
	}
	// Every symbol the guest printed, except the kallsyms_* labels that
	// kernels before 7.x leave out of their own table.
	compared := 0
	for name, want := range truth {
		got, ok := k.Symbol(name)
		if !ok {
			if !strings.HasPrefix(name, "kallsyms_") && name != "swapper_pg_dir" {
				t.Errorf("Symbol(%s) not found; guest has %#x", name, want)
			}
			continue
		}
		compared++
		if got != want {
			t.Errorf("Symbol(%s) = %#x, guest says %#x", name, got, want)
		}
	}
	t.Logf("%d symbols, %d compared with /proc/kallsyms, layout %s", k.Syms.Len(), compared, k.Syms.Layout())
	if k.Syms.Len() < 10000 {
		t.Errorf("only %d symbols", k.Syms.Len())
	}
	it, ok := k.Symbol("init_task")
	if !ok {
		t.Fatal("no init_task")
	}
	if name, off, ok := k.SymbolAt(it + 8); !ok || name != "init_task" || off != 8 {
		t.Errorf("SymbolAt(init_task+8) = %s+%d %v", name, off, ok)
	}
	if pgd, ok := truth["init_top_pgt"]; ok && k.PGD != k.PhysBase+(pgd-text) {
		t.Errorf("PGD = %#x, init_top_pgt is at %#x", k.PGD, k.PhysBase+(pgd-text))
	}
	if k.Levels != d.levels {
		t.Errorf("Levels = %d, want %d", k.Levels, d.levels)
	}
	// The per-CPU area (GS base in the kernel) is in the direct map.
	for _, c := range d.cpus {
		gs := c.GSBase
		if gs < 0xffff800000000000 {
			gs = c.KernelGSBase
		}
		if gs != 0 && (gs < k.PageOffsetBase || gs-k.PageOffsetBase > 64<<30) {
			t.Errorf("cpu %d: GS base %#x is not in the direct map at %#x", c.ID, gs, k.PageOffsetBase)
		}
	}
	if !strings.Contains(k.Banner, d.g.Release()) {
		t.Errorf("banner %q does not name release %q", k.Banner, d.g.Release())
	}
	if !strings.HasPrefix(d.g.Release(), fmt.Sprintf("%d.%d", k.Version.Major, k.Version.Minor)) {
		t.Errorf("version %v, release %q", k.Version, d.g.Release())
	}
	if lb, ok := k.Symbol("linux_banner"); ok {
		b := make([]byte, len(k.Banner))
		if err := k.ReadVirt(b, lb); err != nil || string(b) != k.Banner {
			t.Errorf("ReadVirt(linux_banner) = %q, %v", b, err)
		}
	}
	// Direct map and vmalloc reads go through the page tables.
	if v, err := k.ReadU64(k.PhysToVirt(k.PGD) + 511*8); err != nil || v&guestmem.PTEAddrMask == 0 {
		t.Errorf("read PGD[511] through the direct map: %#x, %v", v, err)
	}
	if got, err := k.VirtToPhys(k.PhysToVirt(0x123456)); err != nil || got != 0x123456 {
		t.Errorf("VirtToPhys(PhysToVirt(0x123456)) = %#x, %v", got, err)
	}

	if !wantBTF {
		if k.BTF != nil {
			t.Error("BTF found on a kernel without it")
		}
		if _, err := k.MemberOffset("task_struct", "tasks"); err == nil {
			t.Error("MemberOffset without BTF succeeded")
		}
		return
	}
	if k.BTF == nil {
		t.Fatal("no BTF")
	}
	tasks, err := k.MemberOffset("task_struct", "tasks")
	if err != nil {
		t.Fatal(err)
	}
	size, err := k.TypeSize("task_struct")
	if err != nil || tasks == 0 || tasks >= size {
		t.Errorf("task_struct.tasks at %d of %d bytes (%v)", tasks, size, err)
	}
	if prev, err := k.MemberOffset("task_struct", "tasks.prev"); err != nil || prev != tasks+8 {
		t.Errorf("task_struct.tasks.prev = %d, %v", prev, err)
	}
	// comm of init_task is "swapper/0" (init/init_task.c: INIT_TASK_COMM).
	comm, err := k.MemberOffset("task_struct", "comm")
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 16)
	if err := k.ReadVirt(b, it+uint64(comm)); err != nil || !strings.HasPrefix(string(b), "swapper") {
		t.Errorf("init_task.comm = %q, %v", b, err)
	}
	t.Logf("task_struct: %d bytes, tasks at %d, comm at %d", size, tasks, comm)
}

func testDiscover(t *testing.T, kernel func(testlinux.Paths) string, qemuArgs []string, cmdline string, wantBTF bool) {
	d := bootForDiscover(t, kernel, qemuArgs, cmdline)
	t.Run("core", func(t *testing.T) {
		start, cpu0 := time.Now(), cpuTime()
		k, err := Discover(d.core, DiscoverOptions{Log: t.Logf})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("Discover on a %d MiB dump without registers: %v (CPU %v); found: %v", memSize(d.core)>>20, time.Since(start), cpuTime()-cpu0, k.Found)
		checkKernel(t, d, k, wantBTF)
	})
	t.Run("core+cpus", func(t *testing.T) {
		start, cpu0 := time.Now(), cpuTime()
		k, err := Discover(d.core, DiscoverOptions{CPUs: d.cpus})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("Discover with %d vCPUs' registers: %v (CPU %v)", len(d.cpus), time.Since(start), cpuTime()-cpu0)
		checkKernel(t, d, k, wantBTF)
	})
	t.Run("text symbols only", func(t *testing.T) {
		// Without CONFIG_KALLSYMS_ALL: no init_top_pgt, page_offset_base,
		// linux_banner or __start_BTF; found by structure instead.
		full, err := Discover(d.core, DiscoverOptions{})
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		k, err := discover(d.core, DiscoverOptions{Log: t.Logf}, textOnly)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("Discover with text symbols only: %v; found: %v", time.Since(start), k.Found)
		if _, ok := k.Symbol("init_task"); ok {
			t.Fatal("filter kept data symbols")
		}
		for _, c := range []struct {
			name      string
			got, want uint64
		}{
			{"TextVA", k.TextVA, full.TextVA},
			{"PhysBase", k.PhysBase, full.PhysBase},
			{"PGD", k.PGD, full.PGD},
			{"Levels", uint64(k.Levels), uint64(full.Levels)},
			{"page_offset_base", k.PageOffsetBase, full.PageOffsetBase},
			{"vmalloc_base", k.VmallocBase, full.VmallocBase},
			{"vmemmap_base", k.VmemmapBase, full.VmemmapBase},
		} {
			if c.got != c.want {
				t.Errorf("%s = %#x, with all symbols %#x", c.name, c.got, c.want)
			}
		}
		if k.Banner != full.Banner {
			t.Errorf("banner %q, with all symbols %q", k.Banner, full.Banner)
		}
		if (k.BTF != nil) != (full.BTF != nil) {
			t.Errorf("BTF found: %v, with all symbols: %v", k.BTF != nil, full.BTF != nil)
		}
		if k.BTF != nil {
			a, err1 := k.MemberOffset("task_struct", "tasks")
			b, err2 := full.MemberOffset("task_struct", "tasks")
			if a != b || err1 != nil || err2 != nil {
				t.Errorf("task_struct.tasks %d (%v), with all symbols %d (%v)", a, err1, b, err2)
			}
		}
	})
	t.Run("live", func(t *testing.T) {
		// The same guest through the live TCG source (QEMU's memory read
		// from its process, memory map from QMP), as `kvmscope run` sees it.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		q, err := guestmem.DialQMP(ctx, d.g.SpareQMP())
		if err != nil {
			t.Fatalf("QMP: %v", err)
		}
		defer q.Close()
		mem := guestmem.NewTCG(q, d.g.Pid, false)
		start, cpu0 := time.Now(), cpuTime()
		k, err := Discover(mem, DiscoverOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("Discover on the live guest without registers: %v (CPU %v)", time.Since(start), cpuTime()-cpu0)
		start, cpu0 = time.Now(), cpuTime()
		if _, err := Discover(mem, DiscoverOptions{CPUs: d.cpus}); err != nil {
			t.Fatal(err)
		}
		t.Logf("Discover on the live guest with registers: %v (CPU %v)", time.Since(start), cpuTime()-cpu0)
		checkKernel(t, d, k, wantBTF)
	})
	t.Run("cross-check", func(t *testing.T) {
		// A CR3 that contradicts memory must be reported.
		bad := append([]guestmem.CPU(nil), d.cpus...)
		for i := range bad {
			bad[i].CR3 = 0x1000 // the real-mode IVT page, no page table
		}
		if _, err := Discover(d.core, DiscoverOptions{CPUs: bad}); err == nil {
			t.Error("Discover accepted CPUs whose CR3 does not map the kernel")
		}
	})
}

// cpuTime is the CPU time this process used so far: wall time on a
// shared 2-core test machine says little.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func memSize(m guestmem.Memory) uint64 {
	var n uint64
	for _, r := range m.Regions() {
		n += r.Size
	}
	return n
}

func TestDiscoverDebian(t *testing.T)  { testDiscover(t, testlinux.Debian, nil, "", true) }
func TestDiscoverGokrazy(t *testing.T) { testDiscover(t, testlinux.Gokrazy, nil, "", false) }

// TestDiscoverDebian612 boots Debian's 6.12 cloud kernel (bookworm's
// linux-image-6.12.*-cloud-amd64): the 6.4+ kallsyms layout with a
// relative base and absolute per-CPU symbols. scripts/fetch-guests.sh
// fetches it.
func TestDiscoverDebian612(t *testing.T) {
	kernel := func(p testlinux.Paths) string { return filepath.Join(p.Dir, "debian-6.12", "vmlinuz") }
	_, err := os.Stat(kernel(testlinux.Require(t)))
	testenv.Check(t, testenv.Guests, err)
	testDiscover(t, kernel, nil, "", true)
}

// TestDiscoverDebianLA57 boots the Debian kernel (CONFIG_X86_5LEVEL) on a
// vCPU with 5-level paging, which TCG emulates, and without KASLR, so the
// fixed 5-level memory layout is used.
func TestDiscoverDebianLA57(t *testing.T) {
	testDiscover(t, testlinux.Debian, []string{"-cpu", "qemu64,+la57"}, "nokaslr", true)
}

// BenchmarkDiscover measures discovery on a dump of the Debian guest.
func BenchmarkDiscover(b *testing.B) {
	p := testlinux.Require(b)
	g, err := testlinux.Boot(context.Background(), testlinux.Options{Kernel: p.DebianKernel, Timeout: 180 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	g.QMP("stop", nil)
	path := filepath.Join(b.TempDir(), "guest.core")
	if err := g.Dump(path); err != nil {
		b.Fatal(err)
	}
	core, err := guestmem.OpenCore(path)
	if err != nil {
		b.Fatal(err)
	}
	defer core.Close()
	b.ResetTimer()
	for b.Loop() {
		if _, err := Discover(core, DiscoverOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}
