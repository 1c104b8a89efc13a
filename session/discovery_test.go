package session

import (
	"strings"
	"testing"

	"github.com/kvmscope/kvmscope/guestmem"
)

// TestInLongMode: the kernel is looked for only once a vCPU has EFER.LMA
// (an x86-64 kernel runs in long mode; before that the guest is in its
// firmware), and without registers the search is not held back.
func TestInLongMode(t *testing.T) {
	real := guestmem.CPU{ID: 0}
	prot := guestmem.CPU{ID: 1, CR0: guestmem.CR0PE}
	long := guestmem.CPU{ID: 1, CR0: guestmem.CR0PE | guestmem.CR0PG, EFER: guestmem.EFERLMA, CSL: true}
	if err := inLongMode(nil); err != nil {
		t.Errorf("no registers: %v", err)
	}
	if err := inLongMode([]guestmem.CPU{real, long}); err != nil {
		t.Errorf("an AP waiting for its SIPI and a BSP in long mode: %v", err)
	}
	err := inLongMode([]guestmem.CPU{real, prot})
	if err == nil || !strings.Contains(err.Error(), "vCPU 0: real mode") || !strings.Contains(err.Error(), "firmware") {
		t.Errorf("firmware: %v", err)
	}
}
