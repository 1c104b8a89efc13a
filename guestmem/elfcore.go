package guestmem

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
)

// Core is guest memory and vCPU state from an ELF core file as QEMU's
// dump-guest-memory writes it (dump/dump.c, target/i386/arch_dump.c):
//
//   - one PT_LOAD segment per block of guest RAM, p_paddr the block's guest
//     physical address (p_vaddr is 0 with paging=false);
//   - a PT_NOTE segment with, per vCPU, an NT_PRSTATUS note named "CORE"
//     (general registers, segment selectors, FS/GS base) and then, per
//     vCPU in the same order, a note named "QEMU" holding QEMU's
//     QEMUCPUState (registers, full segment caches, CR0-CR4).
//
// Core implements Memory and Source. Reads are pread(2)s of the file
// into the caller's buffer, not copies from a mapping of it: the pages
// of a mapped file that a scan touches (and the kernel's fault-around
// maps next to them, 64 KiB at a time) count in the process's RSS, which
// for a scan of a large guest reached most of the file.
type Core struct {
	r       io.ReaderAt
	size    int64
	file    *os.File
	machine elf.Machine
	class   elf.Class
	segs    []coreSegment
	regions []Region
	cpus    []CPU
	cpusErr error
}

// coreSegment is one PT_LOAD: memsz bytes of guest memory at gpa, the first
// filesz of them at file offset off, the rest zeros.
type coreSegment struct {
	gpa, memsz, off, filesz uint64
}

// Bounds on what a core file may ask of the parser.
const (
	maxCoreSegments  = 1 << 16
	maxCoreNotesSize = 16 << 20
	maxCoreCPUs      = 4096
)

// OpenCore opens an ELF core file written by QEMU's dump-guest-memory
// (format "elf"); Close closes it.
func OpenCore(path string) (*Core, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open core: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open core: %w", err)
	}
	c, err := NewCore(f, st.Size())
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("core %s: %w", path, err)
	}
	c.file = f
	return c, nil
}

// NewCore reads an ELF core from r, size bytes long. Reads of guest memory
// go to r.
func NewCore(r io.ReaderAt, size int64) (*Core, error) {
	if size < 0 {
		return nil, fmt.Errorf("negative core size %d", size)
	}
	f, err := elf.NewFile(io.NewSectionReader(r, 0, size))
	if err != nil {
		return nil, fmt.Errorf("not an ELF core: %w", err)
	}
	if f.Type != elf.ET_CORE {
		return nil, fmt.Errorf("ELF type %v, want ET_CORE", f.Type)
	}
	if f.Data != elf.ELFDATA2LSB {
		return nil, fmt.Errorf("ELF data encoding %v, want little-endian (x86)", f.Data)
	}
	if f.Machine != elf.EM_X86_64 && f.Machine != elf.EM_386 {
		return nil, fmt.Errorf("ELF machine %v, want x86 (EM_X86_64 or EM_386)", f.Machine)
	}
	if len(f.Progs) > maxCoreSegments {
		return nil, fmt.Errorf("%d program headers, more than %d", len(f.Progs), maxCoreSegments)
	}
	c := &Core{r: r, size: size, machine: f.Machine, class: f.Class}
	var notes [][]byte
	notesSize := uint64(0)
	for i, p := range f.Progs {
		switch p.Type {
		case elf.PT_LOAD:
			s := coreSegment{gpa: p.Paddr, memsz: p.Memsz, off: p.Off, filesz: p.Filesz}
			if s.memsz == 0 {
				continue
			}
			if s.filesz > s.memsz {
				return nil, fmt.Errorf("PT_LOAD %d: filesz %#x > memsz %#x", i, s.filesz, s.memsz)
			}
			if s.off > uint64(size) || s.filesz > uint64(size)-s.off {
				return nil, fmt.Errorf("PT_LOAD %d: file range %#x+%#x beyond the file's %#x bytes", i, s.off, s.filesz, size)
			}
			if s.gpa+s.memsz < s.gpa || s.gpa+s.memsz > 1<<63 {
				return nil, fmt.Errorf("PT_LOAD %d: guest range %#x+%#x overflows", i, s.gpa, s.memsz)
			}
			c.segs = append(c.segs, s)
		case elf.PT_NOTE:
			if p.Filesz > maxCoreNotesSize-notesSize {
				return nil, fmt.Errorf("PT_NOTE %d: notes larger than %d bytes", i, maxCoreNotesSize)
			}
			notesSize += p.Filesz
			b := make([]byte, p.Filesz)
			if _, err := r.ReadAt(b, int64(p.Off)); err != nil {
				return nil, fmt.Errorf("read PT_NOTE %d at %#x: %w", i, p.Off, err)
			}
			notes = append(notes, b)
		}
	}
	if len(c.segs) == 0 {
		return nil, errors.New("no PT_LOAD segments: the core holds no guest memory")
	}
	sort.Slice(c.segs, func(i, j int) bool { return c.segs[i].gpa < c.segs[j].gpa })
	for i := 1; i < len(c.segs); i++ {
		prev, s := c.segs[i-1], c.segs[i]
		if s.gpa < prev.gpa+prev.memsz {
			return nil, fmt.Errorf("PT_LOAD segments overlap at guest physical %#x", s.gpa)
		}
	}
	for _, s := range c.segs {
		if n := len(c.regions); n > 0 && c.regions[n-1].End() == s.gpa {
			c.regions[n-1].Size += s.memsz
			continue
		}
		c.regions = append(c.regions, Region{GPA: s.gpa, Size: s.memsz, Name: "core"})
	}
	c.cpus, c.cpusErr = c.parseNotes(notes)
	return c, nil
}

// Machine is the ELF machine: EM_X86_64 when QEMU saw the first vCPU in
// long mode, else EM_386.
func (c *Core) Machine() elf.Machine { return c.machine }

// Regions lists the guest physical memory the core holds, adjacent
// segments merged.
func (c *Core) Regions() []Region { return append([]Region(nil), c.regions...) }

// ReadAt reads guest physical memory. Addresses outside every PT_LOAD fail
// with *HoleError; the part of a segment beyond its file size reads as
// zeros.
func (c *Core) ReadAt(p []byte, gpa int64) (int, error) {
	if gpa < 0 {
		return 0, &HoleError{GPA: uint64(gpa)}
	}
	n := 0
	addr := uint64(gpa)
	// The first segment that ends after addr.
	i := sort.Search(len(c.segs), func(i int) bool { return c.segs[i].gpa+c.segs[i].memsz > addr })
	for n < len(p) {
		if i >= len(c.segs) || c.segs[i].gpa > addr {
			return n, &HoleError{GPA: addr}
		}
		s := c.segs[i]
		rel := addr - s.gpa
		chunk := min(uint64(len(p)-n), s.memsz-rel)
		dst := p[n : n+int(chunk)]
		if rel < s.filesz {
			k := min(chunk, s.filesz-rel)
			if err := c.readFile(dst[:k], s.off+rel); err != nil {
				return n, fmt.Errorf("read core at guest physical %#x: %w", addr, err)
			}
			clear(dst[k:])
		} else {
			clear(dst)
		}
		n += int(chunk)
		addr += chunk
		i++
	}
	return n, nil
}

func (c *Core) readFile(dst []byte, off uint64) error {
	k, err := c.r.ReadAt(dst, int64(off))
	if k == len(dst) {
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// CPUs returns the vCPU state recorded in the core's notes, one CPU per
// vCPU. ctx is unused: the state is in the file.
//
// EFER is not in QEMU's notes. It is reconstructed: LME and LMA are set
// when the code segment is a 64-bit one (CS.L, only possible in long mode)
// or when QEMU wrote an EM_X86_64 core (it does so exactly when the first
// vCPU has EFER.LMA) and the vCPU has CR0.PG and CR4.PAE, which long mode
// requires. NXE and SCE are unknown and left clear.
func (c *Core) CPUs(ctx context.Context) ([]CPU, error) {
	if c.cpusErr != nil {
		return nil, c.cpusErr
	}
	return append([]CPU(nil), c.cpus...), nil
}

// Close closes the file.
func (c *Core) Close() error {
	if c.file == nil {
		return nil
	}
	err := c.file.Close()
	c.file = nil
	return err
}

// elfNote is one ELF note: name (without the NUL), type and descriptor.
type elfNote struct {
	name string
	typ  uint32
	desc []byte
}

// splitNotes parses a PT_NOTE segment: 12-byte headers (namesz, descsz,
// type), name and desc each padded to 4 bytes, as Elf32_Nhdr and
// Elf64_Nhdr are laid out alike.
func splitNotes(b []byte) ([]elfNote, error) {
	var notes []elfNote
	for off := 0; len(b)-off >= 12; {
		namesz := uint64(binary.LittleEndian.Uint32(b[off:]))
		descsz := uint64(binary.LittleEndian.Uint32(b[off+4:]))
		typ := binary.LittleEndian.Uint32(b[off+8:])
		off += 12
		nameEnd := uint64(off) + namesz
		descOff := uint64(off) + (namesz+3)&^3
		descEnd := descOff + descsz
		if nameEnd > uint64(len(b)) || descEnd > uint64(len(b)) {
			return notes, fmt.Errorf("note at %#x (name %d, desc %d bytes) runs past the notes' %d bytes", off-12, namesz, descsz, len(b))
		}
		name := string(bytes.TrimRight(b[off:nameEnd], "\x00"))
		notes = append(notes, elfNote{name: name, typ: typ, desc: b[descOff:descEnd]})
		off = int(min(uint64(len(b)), descOff+(descsz+3)&^3))
	}
	return notes, nil
}

// Layout of x86-64 struct elf_prstatus (include/uapi/linux/elfcore.h, as
// QEMU's x86_64_elf_prstatus): pr_pid at 32, pr_reg (struct
// user_regs_struct, 27 8-byte registers) at 112.
const (
	prstatus64PID  = 32
	prstatus64Regs = 112
	prstatus64Size = prstatus64Regs + 27*8
	// i386 struct elf_prstatus: pr_pid at 24, pr_reg (17 4-byte slots)
	// at 72.
	prstatus32PID  = 24
	prstatus32Regs = 72
	prstatus32Size = prstatus32Regs + 17*4
)

// Indexes into x86-64 user_regs_struct (arch/x86/include/asm/user_64.h).
const (
	ur64RIP    = 16
	ur64CS     = 17
	ur64EFLAGS = 18
	ur64RSP    = 19
	ur64FSBase = 21
	ur64GSBase = 22
)

// Layout of QEMU's QEMUCPUState (target/i386/arch_dump.c): version and
// size, 16 general registers, rip, rflags, segments cs ds es fs gs ss ldt
// tr gdt idt (QEMUCPUSegment: selector, limit, flags, pad as uint32, then
// base uint64), cr[5]; QEMU 8.2 and later append kernel_gs_base.
const (
	qcsRIP          = 8 + 16*8
	qcsRFLAGS       = qcsRIP + 8
	qcsSegs         = qcsRFLAGS + 8
	qcsSegSize      = 24
	qcsCR           = qcsSegs + 10*qcsSegSize
	qcsKernelGSBase = qcsCR + 5*8
	qcsMinSize      = qcsKernelGSBase // version 1 as first written
	qcsRSP          = 8 + 6*8
)

// QEMUCPUState segment order.
const (
	qsegCS = iota
	qsegDS
	qsegES
	qsegFS
	qsegGS
	qsegSS
)

// QEMU keeps segment attributes in the layout of a descriptor's high
// dword (target/i386/cpu.h DESC_*_MASK).
const (
	descL = 1 << 21
	descB = 1 << 22
)

// parseNotes builds the vCPU list: the i-th "QEMU" note and the i-th
// NT_PRSTATUS note describe the same vCPU, as QEMU writes all "CORE" notes
// and then all "QEMU" notes in CPU order.
func (c *Core) parseNotes(segs [][]byte) ([]CPU, error) {
	var prstatus, qemu [][]byte
	for _, seg := range segs {
		notes, err := splitNotes(seg)
		if err != nil {
			return nil, fmt.Errorf("core notes: %w", err)
		}
		for _, n := range notes {
			switch {
			case n.name == "CORE" && elf.NType(n.typ) == elf.NT_PRSTATUS:
				prstatus = append(prstatus, n.desc)
			case n.name == "QEMU":
				qemu = append(qemu, n.desc)
			}
		}
	}
	ncpu := max(len(prstatus), len(qemu))
	if ncpu == 0 {
		return nil, errors.New("core has no NT_PRSTATUS or QEMU CPU-state notes")
	}
	if ncpu > maxCoreCPUs {
		return nil, fmt.Errorf("core has %d CPU notes, more than %d", ncpu, maxCoreCPUs)
	}
	if len(qemu) != 0 && len(prstatus) != 0 && len(qemu) != len(prstatus) {
		return nil, fmt.Errorf("core has %d NT_PRSTATUS notes but %d QEMU notes", len(prstatus), len(qemu))
	}
	cpus := make([]CPU, ncpu)
	le := binary.LittleEndian
	for i := range cpus {
		cpu := &cpus[i]
		cpu.ID = i
		if i < len(prstatus) {
			d := prstatus[i]
			switch {
			case c.machine == elf.EM_X86_64 && len(d) >= prstatus64Size:
				// QEMU's pr_pid is the CPU index plus one.
				if pid := le.Uint32(d[prstatus64PID:]); pid > 0 && pid <= maxCoreCPUs {
					cpu.ID = int(pid) - 1
				}
				reg := func(i int) uint64 { return le.Uint64(d[prstatus64Regs+8*i:]) }
				cpu.RIP, cpu.RSP, cpu.RFLAGS = reg(ur64RIP), reg(ur64RSP), reg(ur64EFLAGS)
				cpu.FSBase, cpu.GSBase = reg(ur64FSBase), reg(ur64GSBase)
			case c.machine == elf.EM_386 && len(d) >= prstatus32Size:
				if pid := le.Uint32(d[prstatus32PID:]); pid > 0 && pid <= maxCoreCPUs {
					cpu.ID = int(pid) - 1
				}
				reg := func(i int) uint64 { return uint64(le.Uint32(d[prstatus32Regs+4*i:])) }
				// ebx ecx edx esi edi ebp eax ds es fs gs orig_eax
				// eip cs eflags esp ss
				cpu.RIP, cpu.RFLAGS, cpu.RSP = reg(12), reg(14), reg(15)
			default:
				return nil, fmt.Errorf("CPU %d: NT_PRSTATUS note of %d bytes is too short for %v", i, len(d), c.machine)
			}
		}
		if i < len(qemu) {
			d := qemu[i]
			if len(d) < qcsMinSize {
				return nil, fmt.Errorf("CPU %d: QEMU CPU-state note of %d bytes, want at least %d", i, len(d), qcsMinSize)
			}
			if v := le.Uint32(d); v != 1 {
				return nil, fmt.Errorf("CPU %d: QEMU CPU-state note version %d, want 1", i, v)
			}
			// size is the writer's sizeof(QEMUCPUState); trust only
			// what is both declared and present.
			size := min(uint64(le.Uint32(d[4:])), uint64(len(d)))
			if size < qcsMinSize {
				return nil, fmt.Errorf("CPU %d: QEMU CPU-state note declares %d bytes, want at least %d", i, size, qcsMinSize)
			}
			seg := func(s int) (flags uint32, base uint64) {
				o := qcsSegs + s*qcsSegSize
				return le.Uint32(d[o+8:]), le.Uint64(d[o+16:])
			}
			cpu.RIP = le.Uint64(d[qcsRIP:])
			cpu.RSP = le.Uint64(d[qcsRSP:])
			cpu.RFLAGS = le.Uint64(d[qcsRFLAGS:])
			var csFlags uint32
			csFlags, cpu.CSBase = seg(qsegCS)
			_, cpu.DSBase = seg(qsegDS)
			_, cpu.SSBase = seg(qsegSS)
			_, cpu.FSBase = seg(qsegFS)
			_, cpu.GSBase = seg(qsegGS)
			cpu.CSL = csFlags&descL != 0
			cpu.CSDB = csFlags&descB != 0
			cpu.CR0 = le.Uint64(d[qcsCR:])
			cpu.CR2 = le.Uint64(d[qcsCR+2*8:])
			cpu.CR3 = le.Uint64(d[qcsCR+3*8:])
			cpu.CR4 = le.Uint64(d[qcsCR+4*8:])
			if size >= qcsKernelGSBase+8 {
				cpu.KernelGSBase = le.Uint64(d[qcsKernelGSBase:])
			}
			// See CPUs: EFER is inferred.
			if cpu.CSL || (c.machine == elf.EM_X86_64 && cpu.CR0&CR0PG != 0 && cpu.CR4&CR4PAE != 0) {
				cpu.EFER = EFERLME | EFERLMA
			}
		}
	}
	return cpus, nil
}
