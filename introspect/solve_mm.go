package introspect

import (
	"fmt"

	"github.com/kvmscope/kvmscope/guestmem"
)

// userTop bounds user-space addresses (4-level paging: 47 bits; 5-level:
// 56 bits).
func (k *Kernel) userTop() uint64 {
	if k.Levels == 5 {
		return 1 << 56
	}
	return 1 << 47
}

// kernelPGDHalf returns the kernel half (entries 256-511) of the kernel's
// top-level page table.
func (k *Kernel) kernelPGDHalf() ([]byte, error) {
	root := k.PGD
	if root == 0 && k.AS != nil {
		root = k.AS.Root()
	}
	if root == 0 {
		return nil, fmt.Errorf("kernel page-table root unknown")
	}
	b := make([]byte, 2048)
	if _, err := k.Mem.ReadAt(b, int64(root+2048)); err != nil {
		return nil, fmt.Errorf("read kernel PGD at %#x: %w", root, err)
	}
	return b, nil
}

// looksLikePGD reports whether the page at kernel virtual address va is a
// process's top page table: pgd_alloc() copies the kernel half of
// swapper_pg_dir into every new PGD (arch/x86/mm/pgtable.c, pgd_ctor), and
// the kernel preallocates those entries so they never change afterwards.
// At least 90% of the kernel's non-empty entries must be equal.
func (k *Kernel) looksLikePGD(va uint64, kernelHalf []byte) bool {
	if va&0xfff != 0 || !k.kernelPtr(va) {
		return false
	}
	b := make([]byte, 2048)
	if err := k.ReadVirt(b, va+2048); err != nil {
		return false
	}
	nonEmpty, same := 0, 0
	for i := 0; i < 2048; i += 8 {
		want := le64(kernelHalf, i)
		if want == 0 {
			continue
		}
		nonEmpty++
		if le64(b, i) == want {
			same++
		}
	}
	return nonEmpty > 0 && same*10 >= nonEmpty*9
}

// solveMM finds task_struct.mm and mm_struct.pgd together: mm is NULL in
// init_task and in every kernel thread, a kernel pointer in init (pid 1),
// and NULL or a kernel pointer in the other user tasks (NULL for
// zombies); at one offset in every non-NULL mm there is a page-aligned
// pointer to a page that looks like a PGD (looksLikePGD). active_mm, which
// kernel threads borrow, fails the first test.
func (s *solver) solveMM() error {
	initP := s.taskByPID(1)
	half, err := s.k.kernelPGDHalf()
	if err != nil {
		return err
	}
	type pair struct{ mm, pgd int }
	var found []pair
	win := s.minWindow()
	for o := 0; o+8 <= win; o += 8 {
		if err := s.charge(len(s.tasks) + 1); err != nil {
			return err
		}
		if le64(initP.b, o) == 0 || !s.k.kernelPtr(le64(initP.b, o)) {
			continue
		}
		ok := true
		for _, t := range s.kthreads {
			if le64(t.b, o) != 0 {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		var mms []uint64
		for _, t := range s.users {
			v := le64(t.b, o)
			if v == 0 {
				continue
			}
			if !s.k.kernelPtr(v) {
				ok = false
				break
			}
			mms = append(mms, v)
		}
		if !ok {
			continue
		}
		// pgd: try the offsets on pid 1's mm first, then all.
		first, err := s.read(le64(initP.b, o), mmWindow)
		if err != nil {
			continue
		}
		for g := 0; g+8 <= len(first); g += 8 {
			if err := s.charge(len(mms) + 1); err != nil {
				return err
			}
			if s.spend(1) != nil {
				return ErrBudget
			}
			if !s.k.looksLikePGD(le64(first, g), half) {
				continue
			}
			all := true
			for _, mm := range mms {
				if s.spend(1) != nil {
					return ErrBudget
				}
				p, err := s.k.ReadU64(mm + uint64(g))
				if err != nil || !s.k.looksLikePGD(p, half) {
					all = false
					break
				}
			}
			if all {
				found = append(found, pair{o, g})
			}
		}
	}
	if len(found) != 1 {
		var c []candidate
		for _, f := range found {
			c = append(c, candidate{off: f.mm})
		}
		_, err := one("task_struct.mm", c)
		return fmt.Errorf("%w (with mm_struct.pgd)", err)
	}
	f := found[0]
	for _, t := range s.users {
		t.mm = le64(t.b, f.mm)
		if t.mm != 0 {
			t.mmB, _ = s.read(t.mm, mmWindow)
		}
	}
	s.off.TaskMM = solved(f.mm, fmt.Sprintf("NULL in init_task and the %d kernel threads, a pointer in init and user tasks to a struct whose pgd points to a PGD", len(s.kthreads)))
	s.off.MMPgd = solved(f.pgd, "page-aligned pointer to a page whose kernel half equals swapper_pg_dir's, in every user mm")
	return nil
}

// solveArgs finds mm_struct.arg_start and arg_end: the command line and
// the environment are copied next to each other at the top of the new
// stack by execve (fs/exec.c), so four consecutive user addresses
// arg_start < arg_end == env_start < env_end, each range under 32 MiB, in
// every user mm; and the bytes at arg_start, read through the process's
// own page tables, start with a printable string (argv[0]).
func (s *solver) solveArgs() error {
	var mms []*taskImage
	for _, t := range s.users {
		if t.mm != 0 && len(t.mmB) >= mmWindow {
			mms = append(mms, t)
		}
	}
	if len(mms) == 0 {
		return fmt.Errorf("no user mm to look at")
	}
	top := s.k.userTop()
	var cands []candidate
	for a := 0; a+32 <= mmWindow; a += 8 {
		if err := s.charge(len(mms) + 1); err != nil {
			return err
		}
		ok := true
		for _, t := range mms {
			as, ae, es, ee := le64(t.mmB, a), le64(t.mmB, a+8), le64(t.mmB, a+16), le64(t.mmB, a+24)
			if !(as != 0 && as < ae && ae == es && es < ee && ee < top && ae-as < 32<<20 && ee-es < 32<<20) {
				ok = false
				break
			}
		}
		if ok {
			cands = append(cands, candidate{off: a})
		}
	}
	c, err := one("mm_struct.arg_start", cands)
	if err != nil {
		return err
	}
	// Read argv[0] of one process through its page tables.
	checked := false
	for _, t := range mms {
		pgd := le64(t.mmB, int(s.off.MMPgd.Value))
		pa, err := s.k.VirtToPhys(pgd)
		if err != nil {
			continue
		}
		as := guestmem.NewAddressSpace(s.k.Mem, pa, s.k.Levels)
		b := make([]byte, 16)
		if _, err := as.ReadAt(b, int64(le64(t.mmB, c.off))); err != nil {
			continue
		}
		if _, _, printable := validComm(append(b[:15:15], 0)); printable || b[0] == '/' {
			checked = true
			break
		}
		return fmt.Errorf("mm_struct.arg_start: candidate %#x: bytes at arg_start are not a command line: %q", c.off, b)
	}
	how := "arg_start < arg_end == env_start < env_end, user addresses, in every user mm"
	if checked {
		how += "; argv[0] readable through the process's page tables"
	}
	s.off.MMArgStart = solved(c.off, how)
	s.off.MMArgEnd = solved(c.off+8, "follows arg_start; equal to env_start, which follows it")
	return nil
}
