package session

import (
	"errors"
	"strings"
	"testing"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/introspect"
)

// TestRAMCovered: the e820 map of a 4 GiB i440fx guest (SeaBIOS's,
// as Linux prints it) is held by the right split (3 GiB below, 1 GiB at
// 4 GiB) and not by q35's (2 GiB below) or by no split at all.
func TestRAMCovered(t *testing.T) {
	const gib = 1 << 30
	e820 := []introspect.E820Entry{
		{Addr: 0, Size: 0x9fc00, Type: 1},
		{Addr: 0x9fc00, Size: 0x400, Type: 2},
		{Addr: 0xf0000, Size: 0x10000, Type: 2},
		{Addr: 0x100000, Size: 0xbffdf000 - 0x100000, Type: 1},
		{Addr: 0xbffdf000, Size: 0x21000, Type: 2},
		{Addr: 0xfeffc000, Size: 0x4000, Type: 2},
		{Addr: 0xfffc0000, Size: 0x40000, Type: 2},
		{Addr: 4 * gib, Size: gib, Type: 1},
	}
	split := func(below, total uint64) []guestmem.Region {
		rs := []guestmem.Region{{GPA: 0, Size: below}}
		if below < total {
			rs = append(rs, guestmem.Region{GPA: 4 * gib, Size: total - below})
		}
		return rs
	}
	if err := ramCovered(e820, split(3*gib, 4*gib)); err != nil {
		t.Errorf("the right split: %v", err)
	}
	for name, rs := range map[string][]guestmem.Region{
		"q35's split": split(2*gib, 4*gib),
		"no split":    split(4*gib, 4*gib),
	} {
		if err := ramCovered(e820, rs); !errors.Is(err, ErrMemoryMap) || !strings.Contains(err.Error(), "is not in the map") {
			t.Errorf("%s: %v; want ErrMemoryMap naming the address", name, err)
		}
	}
	if err := ramCovered(e820[1:3], split(4*gib, 4*gib)); !errors.Is(err, ErrMemoryMap) {
		t.Errorf("no RAM in the firmware map: %v", err)
	}
}
