package session

import (
	"context"
	"errors"
	"fmt"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/introspect"
)

// ErrMemoryMap is a guest-physical map the guest's own firmware map
// contradicts.
var ErrMemoryMap = errors.New("the memory map does not hold all the guest's RAM")

// CheckMemoryMap checks the source's guest-physical map against the
// firmware memory map the guest kernel kept (introspect.E820): every
// range the firmware gave the kernel as usable RAM must be memory the
// source maps. A map built without QEMU's monitor (attach --pid alone)
// that splits RAM around the PCI hole in the wrong place fails it: with
// the total fixed, a wrong split leaves RAM on one side of 4 GiB that the
// map does not hold. It returns the firmware map.
func (s *Session) CheckMemoryMap(ctx context.Context) ([]introspect.E820Entry, error) {
	var e820 []introspect.E820Entry
	_, err := s.scan(ctx, "memory map", false, func(k *introspect.Kernel, _ *introspect.Offsets) (err error) {
		e820, err = k.E820()
		return err
	})
	if err != nil {
		return nil, err
	}
	src, err := s.machine.Source()
	if err != nil {
		return nil, err
	}
	return e820, ramCovered(e820, src.Regions())
}

// ramCovered checks that regions hold every RAM range of e820.
func ramCovered(e820 []introspect.E820Entry, regions []guestmem.Region) error {
	ram := 0
	for _, e := range e820 {
		if e.Type != introspect.E820RAM || e.Size == 0 {
			continue
		}
		ram++
		var hole *guestmem.HoleError
		if err := backed(regions, e.Addr, e.Size); errors.As(err, &hole) {
			return fmt.Errorf("%w: the guest's firmware map has RAM at %#x-%#x, and %#x is not in the map", ErrMemoryMap, e.Addr, e.Addr+e.Size, hole.GPA)
		}
	}
	if ram == 0 {
		return fmt.Errorf("%w: the guest's firmware map lists no RAM", ErrMemoryMap)
	}
	return nil
}
