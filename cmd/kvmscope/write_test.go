package main

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/testguest"
)

// TestWriteMemory: host writes of guest memory (run --allow-write, the
// tiny guest under KVM) are all or nothing and recorded. A write that
// runs off the end of guest RAM into a hole fails, names the first
// address that is not memory, and changes nothing; a write that lands is
// read back and is a memory_write event with the old and new bytes.
func TestWriteMemory(t *testing.T) {
	r := startRun(t, []string{"--allow-write"}, tinyGuest(t, 1, "")...)
	c := r.client()
	waitReady(t, c)
	var vm api.VM
	if err := c.Get(ctxT(t), "/v1/vm", &vm); err != nil {
		t.Fatal(err)
	}
	writeAcrossHole(t, c, vm)

	// A write that lands: in the status page, past what the guest uses.
	gpa := uint64(testguest.StatusGPA + 0x800)
	old := readMem(t, c, gpa, 8)
	want := []byte("kvmscope")
	if err := c.Put(ctxT(t), fmt.Sprintf("/v1/memory?gpa=%#x", gpa), want); err != nil {
		t.Fatal(err)
	}
	if got := readMem(t, c, gpa, 8); !bytes.Equal(got, want) {
		t.Errorf("read back %q, want %q", got, want)
	}
	var ev map[string]any
	for _, e := range events(t, r.sock) {
		if e["kind"] == "memory_write" {
			ev = e
		}
	}
	if ev == nil || ev["gpa"] != fmt.Sprintf("%#x", gpa) || ev["old"] != hex.EncodeToString(old) || ev["new"] != hex.EncodeToString(want) || ev["source"] != "api" {
		t.Errorf("memory_write event %v", ev)
	}
}

// writeAcrossHole checks that a write running off the end of guest RAM
// into a hole fails, names the hole's first address and changes nothing.
func writeAcrossHole(t *testing.T, c *api.Client, vm api.VM) {
	t.Helper()
	// The end of a RAM region that no other region continues: a hole.
	var hole uint64
	for _, rg := range vm.Regions {
		end := uint64(rg.GPA) + uint64(rg.Size)
		next := false
		for _, o := range vm.Regions {
			next = next || uint64(o.GPA) == end
		}
		if !next && !rg.ReadOnly {
			hole = end
			break
		}
	}
	if hole == 0 {
		t.Fatalf("no hole after a RAM region: %+v", vm.Regions)
	}
	before := readMem(t, c, hole-8, 8)
	err := c.Put(ctxT(t), fmt.Sprintf("/v1/memory?gpa=%#x", hole-8), bytes.Repeat([]byte{0xee}, 16))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("%#x", hole)) {
		t.Errorf("write across the hole at %#x: %v; want an error naming it", hole, err)
	}
	if after := readMem(t, c, hole-8, 8); !bytes.Equal(after, before) {
		t.Errorf("a failed write changed %x to %x", before, after)
	}
}
