package session

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

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
	src, err := s.machine.Source()
	if err != nil {
		return nil, err
	}
	// MSRs and registers first: reading MSRs kicks the vCPUs, which a
	// paused QEMU would never answer.
	var notes []string
	if r, ok := src.(interface{ ReadEntryMSRs(context.Context) error }); ok {
		if err := r.ReadEntryMSRs(ctx); err != nil {
			notes = append(notes, fmt.Sprintf("LSTAR not read: %v", err))
		}
	}
	cpus, err := src.CPUs(ctx)
	if err != nil {
		notes = append(notes, fmt.Sprintf("no vCPU registers (IDT and control registers not checked): %v", err))
	}
	var idt uint64
	for _, c := range cpus {
		if c.Mode() == "long" && c.IDTBase != 0 {
			idt = c.IDTBase
			break
		}
	}
	if idt == 0 && err == nil {
		notes = append(notes, "IDT not checked: no vCPU in long mode with an IDT (dumps carry no IDTR)")
	}
	out := &Integrity{At: time.Now(), Baseline: "none", Deviations: []introspect.Deviation{}}
	_, err = s.scan(ctx, "integrity", true, func(k *introspect.Kernel, _ *introspect.Offsets) error {
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
		out.Baseline = "taken"
		return saveBaseline(baselinePath, baselineFile{Banner: k.Banner, TextVA: k.TextVA, Taken: out.At, Dispatch: d})
	})
	if err != nil {
		return nil, err
	}
	out.Notes = notes
	return out, nil
}

// merge adds the baseline's deviations to the kernel's own, one per
// location: where both name a place, the one with the baseline stays.
func merge(judged, compared []introspect.Deviation) []introspect.Deviation {
	seen := map[string]bool{}
	for _, d := range compared {
		seen[d.What] = true
	}
	var out []introspect.Deviation
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
