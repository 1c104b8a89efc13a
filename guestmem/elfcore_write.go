package guestmem

import (
	"bufio"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"io"
)

// WriteCore writes mem and cpus as an ELF core in the format of QEMU's
// dump-guest-memory (paging off): one PT_LOAD per memory region with
// p_paddr the guest physical address, and per vCPU an NT_PRSTATUS note and
// a "QEMU" CPU-state note carrying the control registers. crash, Volatility
// and kvmscope's own OpenCore read it. ROM regions are left out, as QEMU
// does. progress, when set, is called with bytes written so far and the
// total.
func WriteCore(w io.Writer, mem Memory, cpus []CPU, progress func(done, total uint64)) error {
	l, err := newCoreLayout(mem, cpus)
	if err != nil {
		return err
	}
	regions, notes, notesOff, dataOff, total := l.regions, l.notes, l.notesOff, l.dataOff, l.ram
	const ehsize, phentsize = 64, 56
	phnum := 1 + len(regions)
	bw := bufio.NewWriterSize(w, 1<<20)
	le := binary.LittleEndian
	hdr := make([]byte, 0, dataOff)
	hdr = append(hdr, 0x7f, 'E', 'L', 'F', byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT), byte(elf.ELFOSABI_NONE))
	hdr = append(hdr, make([]byte, 8)...)
	hdr = le.AppendUint16(hdr, uint16(elf.ET_CORE))
	hdr = le.AppendUint16(hdr, uint16(elf.EM_X86_64))
	hdr = le.AppendUint32(hdr, uint32(elf.EV_CURRENT))
	hdr = le.AppendUint64(hdr, 0)      // entry
	hdr = le.AppendUint64(hdr, ehsize) // phoff
	hdr = le.AppendUint64(hdr, 0)      // shoff
	hdr = le.AppendUint32(hdr, 0)      // flags
	hdr = le.AppendUint16(hdr, ehsize)
	hdr = le.AppendUint16(hdr, phentsize)
	hdr = le.AppendUint16(hdr, uint16(phnum))
	hdr = le.AppendUint16(hdr, 0) // shentsize
	hdr = le.AppendUint16(hdr, 0) // shnum
	hdr = le.AppendUint16(hdr, 0) // shstrndx
	phdr := func(typ elf.ProgType, flags elf.ProgFlag, off, paddr, size, align uint64) {
		hdr = le.AppendUint32(hdr, uint32(typ))
		hdr = le.AppendUint32(hdr, uint32(flags))
		hdr = le.AppendUint64(hdr, off)
		hdr = le.AppendUint64(hdr, 0) // vaddr: unknown without paging, as QEMU writes it
		hdr = le.AppendUint64(hdr, paddr)
		hdr = le.AppendUint64(hdr, size) // filesz
		hdr = le.AppendUint64(hdr, size) // memsz
		hdr = le.AppendUint64(hdr, align)
	}
	phdr(elf.PT_NOTE, 0, notesOff, 0, uint64(len(notes)), 0)
	off := dataOff
	for _, r := range regions {
		phdr(elf.PT_LOAD, elf.PF_R|elf.PF_W|elf.PF_X, off, r.GPA, r.Size, 0)
		off += r.Size
	}
	hdr = append(hdr, notes...)
	hdr = append(hdr, make([]byte, int(dataOff)-len(hdr))...)
	if _, err := bw.Write(hdr); err != nil {
		return fmt.Errorf("write core header: %w", err)
	}
	buf := make([]byte, 4<<20)
	var done uint64
	for _, r := range regions {
		for o := uint64(0); o < r.Size; {
			n := min(uint64(len(buf)), r.Size-o)
			if _, err := mem.ReadAt(buf[:n], int64(r.GPA+o)); err != nil {
				return fmt.Errorf("read guest memory for the core: %w", err)
			}
			if _, err := bw.Write(buf[:n]); err != nil {
				return fmt.Errorf("write core: %w", err)
			}
			o += n
			done += n
			if progress != nil {
				progress(done, total)
			}
		}
	}
	return bw.Flush()
}

// coreLayout is where everything goes in a core file.
type coreLayout struct {
	regions           []Region
	notes             []byte
	notesOff, dataOff uint64
	ram               uint64 // bytes of memory
}

func newCoreLayout(mem Memory, cpus []CPU) (coreLayout, error) {
	var l coreLayout
	for _, r := range mem.Regions() {
		if r.ReadOnly || r.Size == 0 {
			continue
		}
		l.regions = append(l.regions, r)
		l.ram += r.Size
	}
	if len(l.regions) == 0 {
		return l, fmt.Errorf("write core: the guest has no RAM regions")
	}
	l.notes = coreNotes(cpus)
	l.notesOff = uint64(64 + 56*(1+len(l.regions)))
	l.dataOff = alignUp(l.notesOff+uint64(len(l.notes)), 4096)
	return l, nil
}

// CoreSize is the size of the file WriteCore writes for mem and cpus.
func CoreSize(mem Memory, cpus []CPU) (uint64, error) {
	l, err := newCoreLayout(mem, cpus)
	return l.dataOff + l.ram, err
}

func alignUp(v, a uint64) uint64 { return (v + a - 1) &^ (a - 1) }

// coreNotes builds the notes: all NT_PRSTATUS first, then all QEMU
// CPU-state notes, in CPU order, as QEMU does (see parseNotes).
func coreNotes(cpus []CPU) []byte {
	le := binary.LittleEndian
	var out []byte
	note := func(name string, typ uint32, desc []byte) {
		out = le.AppendUint32(out, uint32(len(name)+1))
		out = le.AppendUint32(out, uint32(len(desc)))
		out = le.AppendUint32(out, typ)
		out = append(out, name...)
		out = append(out, 0)
		for len(out)%4 != 0 {
			out = append(out, 0)
		}
		out = append(out, desc...)
		for len(out)%4 != 0 {
			out = append(out, 0)
		}
	}
	for i, c := range cpus {
		d := make([]byte, prstatus64Size+8) // + pr_fpvalid and padding (336 bytes in all)
		le.PutUint32(d[prstatus64PID:], uint32(i+1))
		reg := func(idx int, v uint64) { le.PutUint64(d[prstatus64Regs+8*idx:], v) }
		reg(ur64RIP, c.RIP)
		reg(ur64EFLAGS, c.RFLAGS)
		reg(ur64RSP, c.RSP)
		reg(ur64FSBase, c.FSBase)
		reg(ur64GSBase, c.GSBase)
		note("CORE", uint32(elf.NT_PRSTATUS), d)
	}
	for _, c := range cpus {
		d := make([]byte, qcsKernelGSBase+8)
		le.PutUint32(d[0:], 1)
		le.PutUint32(d[4:], uint32(len(d)))
		le.PutUint64(d[qcsRSP:], c.RSP)
		le.PutUint64(d[qcsRIP:], c.RIP)
		le.PutUint64(d[qcsRFLAGS:], c.RFLAGS)
		seg := func(s int, flags uint32, base uint64) {
			o := qcsSegs + s*qcsSegSize
			le.PutUint32(d[o+8:], flags)
			le.PutUint64(d[o+16:], base)
		}
		var csFlags uint32
		if c.CSL {
			csFlags |= descL
		}
		if c.CSDB {
			csFlags |= descB
		}
		seg(qsegCS, csFlags, c.CSBase)
		seg(qsegDS, 0, c.DSBase)
		seg(qsegSS, 0, c.SSBase)
		seg(qsegFS, 0, c.FSBase)
		seg(qsegGS, 0, c.GSBase)
		le.PutUint64(d[qcsCR:], c.CR0)
		le.PutUint64(d[qcsCR+2*8:], c.CR2)
		le.PutUint64(d[qcsCR+3*8:], c.CR3)
		le.PutUint64(d[qcsCR+4*8:], c.CR4)
		le.PutUint64(d[qcsKernelGSBase:], c.KernelGSBase)
		note("QEMU", 0, d)
	}
	return out
}
