package session

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/kvmscope/kvmscope/guestmem"
)

// MemoryWrite is one write of guest memory from the host, as its event
// (kind "memory_write") records it: where, and the bytes before and
// after (hex; at most eventBytes of each, with the whole length).
type MemoryWrite struct {
	GPA string `json:"gpa"`
	// VA is the kernel virtual address written, for a write made at one
	// (GPA is then where its first page is).
	VA     string `json:"va,omitempty"`
	Len    int    `json:"len"`
	Old    string `json:"old"`
	New    string `json:"new"`
	Source string `json:"source"`
}

// eventBytes bounds the bytes of a write an event shows.
const eventBytes = 4096

// ErrVerify is a write that did not read back as written (a read-only
// region, a device behind the address): what was there is put back.
var ErrVerify = errors.New("the write did not read back as written")

// WriteMemory writes data at guest-physical gpa with the guest paused,
// all or nothing: a range that is not all guest memory (a hole) fails
// before anything is written, with the first address that is not; the
// old bytes are read first, the new ones read back after, and a write
// that does not read back is undone. Each write is an event (with
// SetEvents).
func (s *Session) WriteMemory(ctx context.Context, gpa uint64, data []byte, source string) (*MemoryWrite, error) {
	mw, err := s.writeChunks(ctx, []chunk{{gpa, data}}, source)
	if mw != nil {
		mw.GPA = fmt.Sprintf("%#x", gpa)
	}
	return s.recorded(mw, err)
}

// WriteKernelMemory is WriteMemory at a kernel virtual address, through
// the guest kernel's own page tables: every page of the range must be
// mapped (else nothing is written, and the error names the first that is
// not), and the pages, which need not be contiguous in guest-physical
// memory, are written in one pause.
func (s *Session) WriteKernelMemory(ctx context.Context, va uint64, data []byte, source string) (*MemoryWrite, error) {
	if len(data) == 0 || va+uint64(len(data)) < va {
		return nil, fmt.Errorf("bad range %#x+%d", va, len(data))
	}
	k, _, _, err := s.Kernel(ctx)
	if err != nil {
		return nil, err
	}
	var chunks []chunk
	for off := 0; off < len(data); {
		at := va + uint64(off)
		n := min(len(data)-off, int(4096-at&0xfff))
		pa, err := k.VirtToPhys(at)
		if err != nil {
			return nil, fmt.Errorf("kernel virtual address %#x: %w", at, err)
		}
		chunks = append(chunks, chunk{pa, data[off : off+n]})
		off += n
	}
	mw, err := s.writeChunks(ctx, chunks, source)
	if mw != nil {
		mw.VA = fmt.Sprintf("%#x", va)
		mw.GPA = fmt.Sprintf("%#x", chunks[0].gpa)
	}
	return s.recorded(mw, err)
}

// chunk is a piece of a write: data at guest-physical gpa.
type chunk struct {
	gpa  uint64
	data []byte
}

// writeChunks writes every chunk, with the guest paused, or none: each is
// checked to be guest memory first, read before, read back after; a
// failure puts back what was written.
func (s *Session) writeChunks(ctx context.Context, chunks []chunk, source string) (*MemoryWrite, error) {
	src, err := s.Memory()
	if err != nil {
		return nil, err
	}
	w, ok := src.(guestmem.Writer)
	if !ok || !guestmem.CapabilitiesOf(src).Write {
		return nil, guestmem.ErrReadOnly
	}
	total := 0
	for _, c := range chunks {
		if len(c.data) == 0 {
			return nil, errors.New("nothing to write")
		}
		if err := backed(src.Regions(), c.gpa, uint64(len(c.data))); err != nil {
			return nil, err
		}
		total += len(c.data)
	}
	resume, err := s.pauseForWrite(ctx)
	if err != nil {
		return nil, err
	}
	defer resume()
	olds := make([][]byte, len(chunks))
	for i, c := range chunks {
		olds[i] = make([]byte, len(c.data))
		if _, err := src.ReadAt(olds[i], int64(c.gpa)); err != nil {
			return nil, fmt.Errorf("read the bytes before the write: %w", err)
		}
	}
	undo := func(upTo int) {
		for i := 0; i <= upTo && i < len(chunks); i++ {
			w.WriteAt(olds[i], int64(chunks[i].gpa))
		}
	}
	for i, c := range chunks {
		if _, err := w.WriteAt(c.data, int64(c.gpa)); err != nil {
			undo(i)
			return nil, err
		}
		back := make([]byte, len(c.data))
		if _, err := src.ReadAt(back, int64(c.gpa)); err != nil || !bytes.Equal(back, c.data) {
			undo(i)
			if err != nil {
				return nil, fmt.Errorf("%w: read back: %v", ErrVerify, err)
			}
			return nil, fmt.Errorf("%w at %#x", ErrVerify, c.gpa+uint64(firstDiff(back, c.data)))
		}
	}
	old, data := bytes.Join(olds, nil), make([]byte, 0, total)
	for _, c := range chunks {
		data = append(data, c.data...)
	}
	mw := &MemoryWrite{Len: total, Old: hex.EncodeToString(old[:min(len(old), eventBytes)]), New: hex.EncodeToString(data[:min(len(data), eventBytes)]), Source: source}
	return mw, nil
}

// pauseForWrite pauses the guest for a write of its memory or registers.
// It refuses while an action inside the guest runs (ErrWriteDuringAction),
// and an action does not start until resume is called.
func (s *Session) pauseForWrite(ctx context.Context) (resume func(), err error) {
	done, err := s.beginWrite()
	if err != nil {
		return nil, err
	}
	paused, err := s.machine.Pause(ctx)
	if err != nil {
		done()
		return nil, fmt.Errorf("pause the VM for the write: %w", err)
	}
	return func() { paused(); done() }, nil
}

// beginWrite marks a write of guest memory or registers as under way
// until done is called: refused while an action inside the guest runs
// (ErrWriteDuringAction), and an action does not start meanwhile.
func (s *Session) beginWrite() (done func(), err error) {
	s.exclMu.Lock()
	defer s.exclMu.Unlock()
	if s.acting {
		return nil, ErrWriteDuringAction
	}
	s.writes++
	return func() {
		s.exclMu.Lock()
		s.writes--
		s.exclMu.Unlock()
	}, nil
}

// recorded makes mw an event, once its caller has said where it was.
func (s *Session) recorded(mw *MemoryWrite, err error) (*MemoryWrite, error) {
	if err == nil {
		s.record("memory_write", mw)
	}
	return mw, err
}

// record appends an event of kind, when the session keeps events.
func (s *Session) record(kind string, fields any) {
	if ev := s.eventSink(); ev != nil {
		ev.Append(kind, fields)
	}
}

// backed checks that [gpa, gpa+n) is all guest memory: the first address
// that is not is the error. (ROM, and the pages the guard keeps read-only
// for the guest, are the host's to write: the source routes those.)
func backed(regions []guestmem.Region, gpa, n uint64) error {
	if gpa+n < gpa {
		return &guestmem.HoleError{GPA: gpa}
	}
	for at := gpa; at < gpa+n; {
		var in *guestmem.Region
		for i := range regions {
			if r := &regions[i]; at >= r.GPA && at < r.End() {
				in = r
				break
			}
		}
		if in == nil {
			return &guestmem.HoleError{GPA: at}
		}
		at = in.End()
	}
	return nil
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return 0
}

// ReadKernelMemory reads n bytes at a kernel virtual address, through the
// guest kernel's own page tables.
func (s *Session) ReadKernelMemory(ctx context.Context, va uint64, n int) ([]byte, error) {
	k, _, _, err := s.Kernel(ctx)
	if err != nil {
		return nil, err
	}
	b := make([]byte, n)
	if err := k.ReadVirt(b, va); err != nil {
		return nil, fmt.Errorf("kernel virtual address %#x+%d: %w", va, n, err)
	}
	return b, nil
}
