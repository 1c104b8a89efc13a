package session

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/introspect"
)

// Integrity is one check of the guest's system-call dispatch
// (docs/dispatch-guard.md).
type Integrity struct {
	At time.Time `json:"at"`
	// Baseline is "compared" (against the baseline of an earlier scan),
	// "taken" (this scan is the baseline), or "none" (a dump, judged by
	// what the kernel itself says only).
	Baseline   string                 `json:"baseline"`
	Deviations []introspect.Deviation `json:"deviations"`
	// Notes say what could not be checked, and why.
	Notes []string `json:"notes,omitempty"`
}

// baselineFile is the persisted baseline: the dispatch, and the kernel it
// belongs to (a reboot, or another KASLR slide, needs a new one).
type baselineFile struct {
	Banner   string               `json:"banner"`
	TextVA   uint64               `json:"text_va"`
	Taken    time.Time            `json:"taken"`
	Dispatch *introspect.Dispatch `json:"dispatch"`
}

// Integrity checks the guest's system-call dispatch: the kernel's own
// rules always (Judge, JudgeCPUs), and, with baselinePath, against the
// baseline kept there, which the first scan takes. The read is made with
// the guest paused.
func (s *Session) Integrity(ctx context.Context, baselinePath string) (*Integrity, error) {
	return s.integrity(ctx, baselinePath, false)
}

// integrity is Integrity, or with quick the check a scheduled scan makes
// between full ones: the tables and the code only, read without pausing
// the guest, without kicking the vCPUs for their MSRs and registers (no
// IDT, LSTAR or control-register check). A quick check never takes the
// baseline.
func (s *Session) integrity(ctx context.Context, baselinePath string, quick bool) (*Integrity, error) {
	src, err := s.machine.Source()
	if err != nil {
		return nil, err
	}
	if quick {
		if _, err := loadBaseline(baselinePath); err != nil {
			quick = false
		}
	}
	// MSRs and registers first: reading MSRs kicks the vCPUs, which a
	// paused QEMU would never answer.
	var notes []string
	var cpus []guestmem.CPU
	if !quick {
		if r, ok := src.(interface{ ReadEntryMSRs(context.Context) error }); ok {
			if err := r.ReadEntryMSRs(ctx); err != nil {
				notes = append(notes, fmt.Sprintf("LSTAR not read: %v", err))
			}
		}
		if cpus, err = src.CPUs(ctx); err != nil {
			notes = append(notes, fmt.Sprintf("no vCPU registers (IDT and control registers not checked): %v", err))
		}
	}
	var idt uint64
	for _, c := range cpus {
		if c.Mode() == "long" && c.IDTBase != 0 {
			idt = c.IDTBase
			break
		}
	}
	if idt == 0 && err == nil && !quick {
		notes = append(notes, "IDT not checked: no vCPU in long mode with an IDT (dumps carry no IDTR)")
	}
	out := &Integrity{At: time.Now(), Baseline: "none", Deviations: []introspect.Deviation{}}
	_, err = s.scan(ctx, "integrity", !quick, func(k *introspect.Kernel, _ *introspect.Offsets) error {
		d, err := k.ReadDispatch(idt)
		if err != nil {
			return err
		}
		out.Deviations = append(out.Deviations, k.Judge(d)...)
		devs, n := k.JudgeCPUs(cpus)
		out.Deviations = append(out.Deviations, devs...)
		notes = append(notes, n...)
		if baselinePath == "" {
			return nil
		}
		base, err := loadBaseline(baselinePath)
		switch {
		case err == nil && base.Banner == k.Banner && base.TextVA == k.TextVA:
			out.Baseline = "compared"
			out.Deviations = merge(out.Deviations, introspect.Compare(base.Dispatch, d, k))
			return nil
		case err == nil:
			notes = append(notes, "the baseline belongs to another boot of the guest (kernel or KASLR slide changed): a new one was taken")
		case !errors.Is(err, os.ErrNotExist):
			return fmt.Errorf("integrity baseline: %w", err)
		}
		if quick {
			return errNeedFull
		}
		out.Baseline = "taken"
		return saveBaseline(baselinePath, baselineFile{Banner: k.Banner, TextVA: k.TextVA, Taken: out.At, Dispatch: d})
	})
	if errors.Is(err, errNeedFull) {
		return s.integrity(ctx, baselinePath, false)
	}
	if err != nil {
		return nil, err
	}
	out.Notes = notes
	return out, nil
}

// errNeedFull stops a quick check that would have to take a baseline.
var errNeedFull = errors.New("integrity: a full check is needed")

// merge adds the baseline's deviations to the kernel's own, one per
// location: where both name a place, the one with the baseline stays.
func merge(judged, compared []introspect.Deviation) []introspect.Deviation {
	seen := map[string]bool{}
	for _, d := range compared {
		seen[d.What] = true
	}
	out := []introspect.Deviation{}
	for _, d := range judged {
		if !seen[d.What] {
			out = append(out, d)
		}
	}
	return append(out, compared...)
}

func loadBaseline(path string) (*baselineFile, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var f baselineFile
	if err := json.Unmarshal(b, &f); err != nil || f.Dispatch == nil {
		return nil, fmt.Errorf("%s: not a kvmscope baseline", path)
	}
	return &f, nil
}

// saveBaseline writes through a temporary file and a rename, so a reader
// never sees half a baseline.
func saveBaseline(path string, f baselineFile) error {
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".baseline-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// ErrNotWritable is returned by RestoreDispatch for a VM whose memory may
// not be written (kvmscope run without --allow-write).
var ErrNotWritable = errors.New("restoring needs a VM started with --allow-write")

// RestoreDispatch writes the baseline back over every table entry and
// code range that differs from it (the kernel's own runtime patches, the
// IDT and the control registers are left alone), with the guest paused,
// and reads each write back; then it puts LSTAR back at entry_SYSCALL_64
// on every vCPU where it points elsewhere (restoreLSTAR). It returns what
// it restored.
func (s *Session) RestoreDispatch(ctx context.Context, baselinePath string) ([]introspect.Deviation, error) {
	if baselinePath == "" {
		return nil, errors.New("no baseline to restore from")
	}
	// Checked before the scan: a scan that fails is retried after finding
	// the kernel again, which this refusal does not need.
	src, err := s.machine.Source()
	if err != nil {
		return nil, err
	}
	if w, ok := src.(guestmem.Writer); !ok || !guestmem.Writable(w) {
		return nil, ErrNotWritable
	}
	base, err := loadBaseline(baselinePath)
	if err != nil {
		return nil, fmt.Errorf("integrity baseline: %w (run kvmscope integrity first)", err)
	}
	var restored []introspect.Deviation
	_, err = s.scan(ctx, "restore", true, func(k *introspect.Kernel, _ *introspect.Offsets) error {
		w, ok := k.Mem.(guestmem.Writer)
		if !ok || !guestmem.Writable(w) {
			return ErrNotWritable
		}
		if base.Banner != k.Banner || base.TextVA != k.TextVA {
			return errors.New("the baseline belongs to another boot of the guest: nothing restored")
		}
		cur, err := k.ReadDispatch(0)
		if err != nil {
			return err
		}
		for _, d := range introspect.Compare(base.Dispatch, cur, k) {
			va, want, ok := baselineBytes(base.Dispatch, cur, d)
			if !ok {
				continue
			}
			if err := writeVirt(k, w, va, want); err != nil {
				return fmt.Errorf("restore %s: %w", d.What, err)
			}
			restored = append(restored, d)
		}
		return nil
	})
	if err != nil {
		return restored, err
	}
	msrs, err := s.restoreLSTAR(ctx)
	return append(restored, msrs...), err
}

// restoreLSTAR puts the syscall entry MSR back at entry_SYSCALL_64 on
// every vCPU where JudgeCPUs finds it elsewhere, as a register write
// (WriteRegisters: KVM_SET_MSRS run as QEMU, read back, a register_write
// event). It runs after the paused scan: a SIGSTOPped QEMU cannot run the
// ioctl. Sources without MSRs (TCG, dumps) have none to restore. On a
// kernel with PTI trampolines (4.15-5.x) the right value is a per-CPU
// address in the CPU entry area that kvmscope does not compute: a hooked
// LSTAR there is refused, not guessed.
func (s *Session) restoreLSTAR(ctx context.Context) ([]introspect.Deviation, error) {
	src, err := s.machine.Source()
	if err != nil {
		return nil, err
	}
	r, ok := src.(interface{ ReadEntryMSRs(context.Context) error })
	if _, msrs := src.(guestmem.MSRWriter); !ok || !msrs {
		return nil, nil
	}
	if err := r.ReadEntryMSRs(ctx); err != nil {
		return nil, fmt.Errorf("LSTAR not restored: %w", err)
	}
	cpus, err := src.CPUs(ctx)
	if err != nil {
		return nil, fmt.Errorf("LSTAR not restored: %w", err)
	}
	type hooked struct {
		vcpu int
		dev  introspect.Deviation
	}
	var todo []hooked
	var entry uint64
	_, err = s.scan(ctx, "restore lstar", false, func(k *introspect.Kernel, _ *introspect.Offsets) error {
		entry, _ = k.Symbol("entry_SYSCALL_64")
		_, pti := k.Symbol("entry_SYSCALL_64_trampoline")
		for _, c := range cpus {
			devs, _ := k.JudgeCPUs([]guestmem.CPU{c})
			for _, d := range devs {
				if d.Kind != "msr" {
					continue
				}
				if pti {
					return fmt.Errorf("%s not restored: this kernel enters through per-CPU PTI trampolines, whose addresses kvmscope does not compute", d.What)
				}
				todo = append(todo, hooked{c.ID, d})
			}
		}
		return nil
	})
	var restored []introspect.Deviation
	for _, h := range todo {
		if err != nil {
			break
		}
		if _, err = s.WriteRegisters(ctx, h.vcpu, map[string]uint64{"lstar": entry}); err != nil {
			err = fmt.Errorf("restore %s: %w", h.dev.What, err)
			break
		}
		restored = append(restored, h.dev)
	}
	return restored, err
}

// baselineBytes is where deviation d is and what the baseline holds
// there: a table entry ("sys_call_table[62]") or a code range
// ("x64_sys_call+0x1a3": the bytes that differ from there on).
func baselineBytes(base, cur *introspect.Dispatch, d introspect.Deviation) (va uint64, b []byte, ok bool) {
	switch d.Kind {
	case "table":
		for _, t := range base.Tables {
			var i int
			if _, err := fmt.Sscanf(d.What, t.Name+"[%d]", &i); err == nil && i >= 0 && i < len(t.Entries) {
				b = make([]byte, 8)
				binary.LittleEndian.PutUint64(b, t.Entries[i])
				return t.Addr + 8*uint64(i), b, true
			}
		}
	case "code", "call_target":
		for i, f := range base.Functions {
			var off uint64
			if !strings.HasPrefix(d.What, f.Name+"+") {
				continue
			}
			if _, err := fmt.Sscanf(d.What[len(f.Name)+1:], "%v", &off); err != nil || i >= len(cur.Functions) || cur.Functions[i].Name != f.Name {
				return 0, nil, false
			}
			// The changed range: from off, over the bytes that differ
			// (gaps of equal bytes under 16 included; rewriting equal
			// bytes changes nothing).
			c := cur.Functions[i].Code
			end := off
			for j := off; j < uint64(min(len(c), len(f.Code))) && j < end+16; j++ {
				if c[j] != f.Code[j] {
					end = j + 1
				}
			}
			if end == off {
				return 0, nil, false
			}
			return f.Addr + off, f.Code[off:end], true
		}
	}
	return 0, nil, false
}

// writeVirt writes b at kernel virtual address va, page by page (virtual
// pages need not be physically contiguous), and reads it back.
func writeVirt(k *introspect.Kernel, w guestmem.Writer, va uint64, b []byte) error {
	for done := 0; done < len(b); {
		pa, err := k.VirtToPhys(va + uint64(done))
		if err != nil {
			return err
		}
		n := min(len(b)-done, int(4096-(va+uint64(done))%4096))
		if _, err := w.WriteAt(b[done:done+n], int64(pa)); err != nil {
			return err
		}
		done += n
	}
	got := make([]byte, len(b))
	if err := k.ReadVirt(got, va); err != nil {
		return err
	}
	if !bytes.Equal(got, b) {
		return errors.New("read back differs from what was written")
	}
	return nil
}
