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
	GPA    string `json:"gpa"`
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
// that does not read back is undone. Each write is an event (with SetEvents).
func (s *Session) WriteMemory(ctx context.Context, gpa uint64, data []byte, source string) (*MemoryWrite, error) {
	src, err := s.Memory()
	if err != nil {
		return nil, err
	}
	w, ok := src.(guestmem.Writer)
	if !ok || !guestmem.CapabilitiesOf(src).Write {
		return nil, guestmem.ErrReadOnly
	}
	if len(data) == 0 {
		return nil, errors.New("nothing to write")
	}
	if err := backed(src.Regions(), gpa, uint64(len(data))); err != nil {
		return nil, err
	}
	resume, err := s.machine.Pause(ctx)
	if err != nil {
		return nil, fmt.Errorf("pause the VM for the write: %w", err)
	}
	defer resume()
	old := make([]byte, len(data))
	if _, err := src.ReadAt(old, int64(gpa)); err != nil {
		return nil, fmt.Errorf("read the bytes before the write: %w", err)
	}
	if _, err := w.WriteAt(data, int64(gpa)); err != nil {
		w.WriteAt(old, int64(gpa))
		return nil, err
	}
	back := make([]byte, len(data))
	if _, err := src.ReadAt(back, int64(gpa)); err != nil || !bytes.Equal(back, data) {
		w.WriteAt(old, int64(gpa))
		if err != nil {
			return nil, fmt.Errorf("%w: read back: %v", ErrVerify, err)
		}
		return nil, fmt.Errorf("%w at %#x", ErrVerify, gpa+uint64(firstDiff(back, data)))
	}
	mw := &MemoryWrite{GPA: fmt.Sprintf("%#x", gpa), Len: len(data), Old: hex.EncodeToString(old[:min(len(old), eventBytes)]), New: hex.EncodeToString(data[:min(len(data), eventBytes)]), Source: source}
	if ev := s.eventSink(); ev != nil {
		ev.Append("memory_write", mw)
	}
	return mw, nil
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
