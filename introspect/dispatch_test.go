package introspect

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/arch/x86/x86asm"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// These tests boot the real kernels under TCG (bootGuest, discoverLive),
// read the dispatch through the live memory source with the IDTR of a
// vCPU, and check it: a clean kernel judges clean, then a copy of its
// memory with bytes overlaid (patchedMem) is tampered with as rootkits
// do, and Judge and Compare must name exactly what changed.

func TestDispatchDebian(t *testing.T) { testDispatch(t, testlinux.Debian, true) }

func TestDispatchDebian612(t *testing.T) {
	kernel := func(p testlinux.Paths) string { return filepath.Join(p.Dir, "debian-6.12", "vmlinuz") }
	_, err := os.Stat(kernel(testlinux.Require(t)))
	testenv.Check(t, testenv.Guests, err)
	testDispatch(t, kernel, false)
}

func TestDispatchGokrazy(t *testing.T) { testDispatch(t, testlinux.Gokrazy, false) }

func testDispatch(t *testing.T, kernel func(testlinux.Paths) string, withModules bool) {
	g, _ := bootGuest(t, kernel, withModules)
	defer g.Close()
	k, _ := discoverLive(t, g)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cpus, err := k.Mem.(*guestmem.TCG).CPUs(ctx)
	if err != nil || len(cpus) == 0 || cpus[0].IDTBase == 0 {
		t.Fatalf("vCPUs: %v (%d), IDT base of vCPU 0 unknown", err, len(cpus))
	}
	idt := cpus[0].IDTBase
	start := time.Now()
	d, err := k.ReadDispatch(idt)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("ReadDispatch: %v; %d tables, %d functions, %d gates", time.Since(start), len(d.Tables), len(d.Functions), len(d.IDT))
	r := newResolver(k, d)

	// The text-patching mm the guard lets through: a page-table root that
	// maps the kernel as the kernel's own does.
	off, _ := FindOffsets(k)
	if pgd, err := k.PokingPGD(off); err != nil {
		t.Errorf("PokingPGD: %v", err)
	} else {
		want, err1 := k.VirtToPhys(k.TextVA)
		got, err2 := guestmem.NewAddressSpace(k.Mem, pgd, k.Levels).Translate(k.TextVA)
		if err1 != nil || err2 != nil || got != want {
			t.Errorf("poking_mm's pgd %#x maps _text to %#x (%v), want %#x (%v)", pgd, got, err2, want, err1)
		}
		// Without solved offsets (early boot, no BTF), the same root.
		if bare, err := k.PokingPGD(nil); err != nil || bare != pgd {
			t.Errorf("PokingPGD without offsets: %#x, %v; want %#x", bare, err, pgd)
		}
	}

	// What the clean kernel holds.
	sct := findTable(d, "sys_call_table")
	if sct == nil || len(sct.Entries) < 300 {
		t.Fatalf("sys_call_table: %+v", sct)
	}
	if got := r.symbol(sct.Entries[0]); got != "__x64_sys_read+0x0" {
		t.Errorf("sys_call_table[0] = %#x, %q; want __x64_sys_read+0x0", sct.Entries[0], got)
	}
	if a, _ := k.Symbol("__x64_sys_kill"); sct.Entries[62] != a {
		t.Errorf("sys_call_table[62] = %#x, __x64_sys_kill is %#x", sct.Entries[62], a)
	}
	x64 := findFunction(d, "x64_sys_call")
	if x64 == nil {
		t.Fatal("no x64_sys_call: the kernel dispatches through it since 6.9 and 6.1.85")
	}
	sysCalls, kill := 0, -1
	for i, c := range x64.Calls {
		name, off, _ := k.SymbolAt(c.Target)
		if strings.HasPrefix(name, "__x64_sys_") && off == 0 {
			sysCalls++
		}
		if name == "__x64_sys_kill" && off == 0 {
			kill = i
		}
	}
	t.Logf("sys_call_table: %d entries; x64_sys_call: %d bytes, %d call sites, %d to __x64_sys_*", len(sct.Entries), x64.Size, len(x64.Calls), sysCalls)
	if sysCalls < 300 || kill < 0 {
		t.Fatalf("x64_sys_call: %d call sites to __x64_sys_*, kill at %d", sysCalls, kill)
	}
	for _, name := range []string{"do_syscall_64", "entry_SYSCALL_64"} {
		if findFunction(d, name) == nil {
			t.Errorf("no %s", name)
		}
	}
	if pf, _ := k.Symbol("asm_exc_page_fault"); len(d.IDT) != 256 || !d.IDT[14].Present || d.IDT[14].Handler != pf {
		t.Errorf("IDT: %d gates, #PF %+v, asm_exc_page_fault %#x", len(d.IDT), d.IDT[14], pf)
	}
	for _, dv := range k.Judge(d) {
		t.Errorf("clean kernel: %+v", dv)
	}
	// A baseline persisted as JSON compares equal to what it was taken from.
	js, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	var saved Dispatch
	if err := json.Unmarshal(js, &saved); err != nil {
		t.Fatal(err)
	}
	if cmp := Compare(&saved, d, k); len(cmp) != 0 {
		t.Errorf("Compare with its own baseline: %+v", cmp)
	}

	// The rootkit's target: a loaded module's text, or outside all text
	// (16 MiB below _text: within a jmp rel32's reach).
	evil, evilSym := k.TextVA-16<<20, ""
	if withModules {
		off, _ := FindOffsets(k)
		mods, err := k.Modules(off)
		if err != nil || len(mods) == 0 {
			t.Fatalf("modules: %v, %v", mods, err)
		}
		evil, evilSym = mods[0].Base+0x10, mods[0].Name+" [module]"
	}
	killAddr := sct.Entries[62]
	site := x64.Calls[kill]
	getpid, _ := k.Symbol("__x64_sys_getpid")

	// Tamper with a copy of guest memory: bytes at kernel virtual
	// addresses overlaid.
	read := func(t *testing.T, patches map[uint64][]byte) *Dispatch {
		t.Helper()
		m := &patchedMem{base: k.Mem}
		for va, b := range patches {
			pa, err := k.VirtToPhys(va)
			if err != nil {
				t.Fatal(err)
			}
			m.patches = append(m.patches, memPatch{pa, b})
		}
		dt, err := k.On(m).ReadDispatch(idt)
		if err != nil {
			t.Fatal(err)
		}
		return dt
	}
	rel32 := func(from, to uint64) []byte { return binary.LittleEndian.AppendUint32(nil, uint32(to-from)) }
	// The table entry and the call in x64_sys_call.
	tamper := func(t *testing.T, callTarget uint64, more map[uint64][]byte) *Dispatch {
		p := map[uint64][]byte{
			sct.Addr + 62*8:            binary.LittleEndian.AppendUint64(nil, evil),
			x64.Addr + site.Offset + 1: rel32(x64.Addr+site.Offset+5, callTarget),
		}
		for va, b := range more {
			p[va] = b
		}
		return read(t, p)
	}
	what := fmt.Sprintf("x64_sys_call+%#x", site.Offset)
	hex := func(v uint64) string { return fmt.Sprintf("%#x", v) }
	t.Run("tampered", func(t *testing.T) {
		// And the page-fault gate, in the IDT the vCPU uses.
		gate := make([]byte, 16)
		copy(gate, idtBytes(t, k, idt, 14))
		binary.LittleEndian.PutUint16(gate[0:], uint16(evil))
		binary.LittleEndian.PutUint16(gate[6:], uint16(evil>>16))
		binary.LittleEndian.PutUint32(gate[8:], uint32(evil>>32))
		dt := tamper(t, evil, map[uint64][]byte{idt + 14*16: gate})
		got := k.Judge(dt)
		want := []Deviation{
			{What: "sys_call_table[62]", Kind: "table", Current: hex(evil), CurrentSymbol: evilSym},
			{What: what, Kind: "call_target", Current: hex(evil), CurrentSymbol: evilSym},
			{What: "idt[14]", Kind: "idt", Current: hex(evil), CurrentSymbol: evilSym},
		}
		checkDeviations(t, "Judge", got, want)
		want[0].Baseline, want[0].BaselineSymbol = hex(killAddr), "__x64_sys_kill+0x0"
		want[1].Baseline, want[1].BaselineSymbol = hex(site.Target), "__x64_sys_kill+0x0"
		want[2].Baseline, want[2].BaselineSymbol = hex(d.IDT[14].Handler), "asm_exc_page_fault+0x0"
		checkDeviations(t, "Compare", Compare(d, dt, k), want)
		for _, dv := range got {
			t.Logf("%s %s: %s %q (%s)", dv.Kind, dv.What, dv.Current, dv.CurrentSymbol, dv.Detail)
		}
	})
	t.Run("runtime patch", func(t *testing.T) {
		// A 5-byte NOP in the entry code (a jump label's or ftrace's site)
		// turned into a jmp within core text is the kernel's own
		// patching; into a call to the module or outside text it is not.
		f, off := findNOP5(d)
		if f == nil {
			t.Skip("no 5-byte NOP in the dispatch functions of this kernel")
		}
		at := f.Addr + off
		t.Logf("NOP5 at %s+%#x", f.Name, off)
		jmp := append([]byte{0xe9}, rel32(at+5, at+5)...)
		got := Compare(d, read(t, map[uint64][]byte{at: jmp}), k)
		if len(got) != 1 || got[0].Kind != "runtime_patch" || got[0].What != fmt.Sprintf("%s+%#x", f.Name, off) {
			t.Errorf("NOP5 → jmp .+5: %+v", got)
		}
		if fc, ok := k.Symbol("ftrace_caller"); ok {
			// Tracing the function: Judge sees it traced, Compare sees
			// ftrace's patch.
			dt := read(t, map[uint64][]byte{at: append([]byte{0xe8}, rel32(at+5, fc)...)})
			got := Compare(d, dt, k)
			if len(got) != 1 || got[0].Kind != "runtime_patch" || got[0].CurrentSymbol != "ftrace_caller+0x0" {
				t.Errorf("NOP5 → call ftrace_caller: Compare %+v", got)
			}
			got = k.Judge(dt)
			if len(got) != 1 || got[0].Kind != "runtime_patch" || got[0].CurrentSymbol != "ftrace_caller+0x0" {
				t.Errorf("NOP5 → call ftrace_caller: Judge %+v", got)
			}
		}
		call := append([]byte{0xe8}, rel32(at+5, evil)...)
		got = Compare(d, read(t, map[uint64][]byte{at: call}), k)
		if len(got) != 1 || got[0].Kind != "code" || got[0].CurrentSymbol != evilSym || got[0].Current != fmt.Sprintf("%x", call) {
			t.Errorf("NOP5 → call evil: %+v", got)
		}
	})
	t.Run("retargeted to another system call", func(t *testing.T) {
		// A call moved to another system call: Judge cannot know, Compare does.
		dt := tamper(t, getpid, nil)
		checkDeviations(t, "Judge", k.Judge(dt), []Deviation{{What: "sys_call_table[62]", Kind: "table", Current: hex(evil), CurrentSymbol: evilSym}})
		checkDeviations(t, "Compare", Compare(d, dt, k), []Deviation{
			{What: "sys_call_table[62]", Kind: "table", Current: hex(evil), CurrentSymbol: evilSym, Baseline: hex(killAddr), BaselineSymbol: "__x64_sys_kill+0x0"},
			{What: what, Kind: "call_target", Current: hex(getpid), CurrentSymbol: "__x64_sys_getpid+0x0", Baseline: hex(site.Target), BaselineSymbol: "__x64_sys_kill+0x0"},
		})
	})
}

// idtBytes reads gate v of the IDT at base.
func idtBytes(t *testing.T, k *Kernel, base uint64, v int) []byte {
	t.Helper()
	b := make([]byte, 16)
	if err := k.ReadVirt(b, base+uint64(v)*16); err != nil {
		t.Fatal(err)
	}
	return b
}

// findNOP5 finds a 5-byte NOP instruction in d's functions.
func findNOP5(d *Dispatch) (*FunctionCode, uint64) {
	for i := range d.Functions {
		f := &d.Functions[i]
		for _, in := range decodeCode(f.Code, f.Addr) {
			if in.op == x86asm.NOP && in.len == 5 {
				return f, uint64(in.off)
			}
		}
	}
	return nil, 0
}

func findTable(d *Dispatch, name string) *SyscallTable {
	for i := range d.Tables {
		if d.Tables[i].Name == name {
			return &d.Tables[i]
		}
	}
	return nil
}

func findFunction(d *Dispatch, name string) *FunctionCode {
	for i := range d.Functions {
		if d.Functions[i].Name == name {
			return &d.Functions[i]
		}
	}
	return nil
}

// checkDeviations compares got with want on every field want sets, Detail
// aside (words for people).
func checkDeviations(t *testing.T, who string, got, want []Deviation) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s: %d deviations, want %d:\n got %+v\nwant %+v", who, len(got), len(want), got, want)
		return
	}
	for i, w := range want {
		g := got[i]
		g.Detail = ""
		if g != w {
			t.Errorf("%s: deviation %d:\n got %+v\nwant %+v (%s)", who, i, g, w, got[i].Detail)
		}
	}
}
