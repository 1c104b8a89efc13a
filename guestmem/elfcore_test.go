package guestmem

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// systemMap reads the named symbols from a System.map.
func systemMap(t *testing.T, path string, names ...string) map[string]uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	syms := map[string]uint64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) == 3 && want[fs[2]] {
			a, err := strconv.ParseUint(fs[0], 16, 64)
			if err == nil {
				syms[fs[2]] = a
			}
		}
	}
	return syms
}

var (
	hmpCR3     = regexp.MustCompile(`CR3=([0-9a-f]{16})`)
	hmpRIP     = regexp.MustCompile(`RIP=([0-9a-f]{16})`)
	hmpGva2gpa = regexp.MustCompile(`gpa: (0x[0-9a-f]+)`)
)

// TestCoreDebian dumps a running Debian 6.1 guest (KASLR, PTI) with QEMU's
// dump-guest-memory and checks the core reader and the page walker against
// QEMU's own view of the same stopped VM, the guest's /proc/kallsyms and
// the kernel's System.map.
func TestCoreDebian(t *testing.T) {
	paths := testlinux.Require(t)
	testCore(t, paths.DebianKernel, paths.DebianSystemMap, true)
}

// TestCoreGokrazy does the same for gokrazy's Linux 7.x (no System.map).
func TestCoreGokrazy(t *testing.T) {
	paths := testlinux.Require(t)
	testCore(t, paths.GokrazyKernel, "", false)
}

func testCore(t *testing.T, kernel, sysmap string, pti bool) {
	g, err := testlinux.Boot(context.Background(), testlinux.Options{Kernel: kernel})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	t.Logf("%s (%s) booted in %v", kernel, g.Release(), g.BootTime())
	if _, err := g.QMP("stop", nil); err != nil {
		t.Fatal(err)
	}
	regs, err := g.HMP("info registers -a")
	if err != nil {
		t.Fatal(err)
	}
	core := filepath.Join(t.TempDir(), "core")
	if err := g.Dump(core); err != nil {
		t.Fatal(err)
	}
	c, err := OpenCore(core)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	cpus, err := c.CPUs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Run("CPUs", func(t *testing.T) {
		cr3s := hmpCR3.FindAllStringSubmatch(regs, -1)
		rips := hmpRIP.FindAllStringSubmatch(regs, -1)
		if len(cpus) != 2 || len(cr3s) != 2 || len(rips) != 2 {
			t.Fatalf("%d CPUs in the core, %d CR3 and %d RIP in info registers -a:\n%s", len(cpus), len(cr3s), len(rips), regs)
		}
		for i, cpu := range cpus {
			t.Logf("CPU %d: %+v", i, cpu)
			cr3, _ := strconv.ParseUint(cr3s[i][1], 16, 64)
			rip, _ := strconv.ParseUint(rips[i][1], 16, 64)
			if cpu.ID != i || cpu.CR3 != cr3 || cpu.RIP != rip {
				t.Errorf("CPU %d: id %d CR3 %#x RIP %#x; info registers: CR3 %#x RIP %#x", i, cpu.ID, cpu.CR3, cpu.RIP, cr3, rip)
			}
			if cpu.Mode() != "long" || cpu.Paging() != 4 {
				t.Errorf("CPU %d: mode %s, %d paging levels; want long, 4 (qemu64 has no LA57): %+v", i, cpu.Mode(), cpu.Paging(), cpu)
			}
			if cpu.GSBase>>63 == 0 && cpu.KernelGSBase>>63 == 0 {
				// One of GS base and KERNEL_GS_BASE is the per-CPU
				// area, a kernel address; QEMU 7.2 does not write
				// the second.
				t.Errorf("CPU %d: GS base %#x is not a kernel address", i, cpu.GSBase)
			}
		}
	})

	t.Run("Memory", func(t *testing.T) {
		var total uint64
		for _, r := range c.Regions() {
			total += r.Size
		}
		if total < 511<<20 || total > 513<<20 {
			t.Errorf("regions %+v hold %d MiB, want 512", c.Regions(), total>>20)
		}
		// The banner is in physical memory.
		found := false
		buf := make([]byte, 1<<20)
		for _, r := range c.Regions() {
			for a := r.GPA; a < r.End() && !found; a += uint64(len(buf)) - 64 {
				n, _ := c.ReadAt(buf[:min(uint64(len(buf)), r.End()-a)], int64(a))
				found = bytes.Contains(buf[:n], []byte("Linux version "+g.Release()))
			}
		}
		if !found {
			t.Errorf("%q not in guest physical memory", "Linux version "+g.Release())
		}
		var hole *HoleError
		end := c.Regions()[len(c.Regions())-1].End()
		if n, err := c.ReadAt(make([]byte, 16), int64(end-8)); n != 8 || !errors.As(err, &hole) || hole.GPA != end {
			t.Errorf("read across the end of RAM: %d, %v", n, err)
		}
		// The reader-based constructor sees the same bytes.
		f, err := os.Open(core)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		st, _ := f.Stat()
		c2, err := NewCore(f, st.Size())
		if err != nil {
			t.Fatal(err)
		}
		a, b := make([]byte, 8192), make([]byte, 8192)
		for _, gpa := range []int64{0x1000, 0x1000000, int64(end) - 8192} {
			n1, err1 := c.ReadAt(a, gpa)
			n2, err2 := c2.ReadAt(b, gpa)
			if n1 != len(a) || n2 != len(b) || err1 != nil || err2 != nil || !bytes.Equal(a, b) {
				t.Errorf("at %#x: OpenCore %d %v, NewCore %d %v, equal %v", gpa, n1, err1, n2, err2, bytes.Equal(a, b))
			}
		}
	})

	t.Run("Translate", func(t *testing.T) {
		ks := g.Kallsyms()
		for _, name := range []string{"_text", "linux_banner", "init_task", "page_offset_base"} {
			if ks[name] == 0 {
				t.Fatalf("guest /proc/kallsyms lacks %s: %x", name, ks)
			}
		}
		if sysmap != "" {
			sm := systemMap(t, sysmap, "_text", "linux_banner", "init_task", "page_offset_base")
			slide := ks["_text"] - sm["_text"]
			if sm["_text"] == 0 || ks["linux_banner"] != sm["linux_banner"]+slide || ks["init_task"] != sm["init_task"]+slide {
				t.Fatalf("kallsyms %x and System.map %x disagree", ks, sm)
			}
			t.Logf("KASLR slide %#x", slide)
		}
		cpu := cpus[0]
		// The vCPU's CR3 may be a user process's PGD; without PTI (gokrazy)
		// its kernel half is still right, with PTI the kernel half of the
		// pair is: KernelAddressSpace tries both.
		as, err := KernelAddressSpace(c, cpu.CR3, cpu.Paging(), ks["linux_banner"])
		if err != nil {
			t.Fatal(err)
		}
		banner := make([]byte, 64)
		if _, err := as.ReadAt(banner, int64(ks["linux_banner"])); err != nil {
			t.Fatal(err)
		}
		want := "Linux version " + g.Release() + " "
		if !bytes.HasPrefix(banner, []byte(want)) {
			t.Errorf("linux_banner at %#x reads %q, want prefix %q", ks["linux_banner"], banner, want)
		}
		// The direct map (RANDOMIZE_MEMORY moves it; the kernel maps
		// it with 1 GiB or 2 MiB pages) maps the banner's page too.
		var pob [8]byte
		if _, err := as.ReadAt(pob[:], int64(ks["page_offset_base"])); err != nil {
			t.Fatal(err)
		}
		pageOffset := binary.LittleEndian.Uint64(pob[:])
		bannerPA, _ := as.Translate(ks["linux_banner"])
		vas := []uint64{ks["_text"], ks["linux_banner"], ks["init_task"], pageOffset + bannerPA, pageOffset + 0x12345678}
		for _, va := range vas {
			gpa, err := as.Translate(va)
			if err != nil {
				t.Errorf("Translate(%#x): %v", va, err)
				continue
			}
			// QEMU's own walk, from the monitor's current CPU (0).
			out, err := g.HMP(fmt.Sprintf("gva2gpa %#x", va))
			m := hmpGva2gpa.FindStringSubmatch(out)
			if err != nil || m == nil {
				t.Errorf("gva2gpa %#x: %q %v", va, out, err)
				continue
			}
			want, _ := strconv.ParseUint(m[1], 0, 64)
			if gpa != want {
				t.Errorf("Translate(%#x) = %#x, QEMU says %#x", va, gpa, want)
			}
		}
		if got, _ := as.Translate(pageOffset + bannerPA); got != bannerPA {
			t.Errorf("direct map: %#x + %#x translates to %#x", pageOffset, bannerPA, got)
		}
		// KernelAddressSpace finds the same tables from the vCPU's
		// CR3 and, for the PTI kernel, from the user half.
		cr3s := []uint64{cpu.CR3}
		if pti {
			cr3s = append(cr3s, KernelCR3(cpu.CR3)|0x1000|0x801)
		}
		for _, cr3 := range cr3s {
			kas, err := KernelAddressSpace(c, cr3, cpu.Paging(), ks["init_task"])
			if err != nil || kas.Root() != as.Root() {
				t.Errorf("KernelAddressSpace(%#x) = %v, %v; want root %#x", cr3, kas, err, as.Root())
			}
		}
		// The banner's page holds text, not page tables.
		if _, err := KernelAddressSpace(c, bannerPA&^0xfff, cpu.Paging(), ks["init_task"]); err == nil {
			t.Error("KernelAddressSpace accepted a page that is not a page table")
		}
		if !pti {
			return
		}
		// The user half of the PTI pair does not map the kernel's data.
		user := NewAddressSpace(c, KernelCR3(cpu.CR3)|0x1000, 4)
		var np *NotPresentError
		if _, err := user.Translate(ks["init_task"]); !errors.As(err, &np) {
			t.Errorf("init_task through the PTI user page tables: %v, want not present", err)
		}
	})
}
