package introspect

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

// TestPartialTasks checks that damage in the forged tasks list keeps the
// tasks read before it and names the damage in a *PartialError.
func TestPartialTasks(t *testing.T) {
	for _, c := range []struct {
		name  string
		edit  func(mem []byte)
		n     int    // tasks before the break
		words string // in the warning
	}{
		{"prev", func(mem []byte) {
			binary.LittleEndian.PutUint64(mem[3*fuzzTask+fTasks+8:], fuzzBase+0x123458)
		}, 3, "prev is 0xffffffff81123458"},
		{"cycle", func(mem []byte) {
			binary.LittleEndian.PutUint64(mem[4*fuzzTask+fTasks:], fuzzBase+2*fuzzTask+fTasks)
		}, 5, "appears twice"},
		{"unreadable", func(mem []byte) {
			binary.LittleEndian.PutUint64(mem[2*fuzzTask+fTasks:], fuzzBase+1<<30)
		}, 3, "after 3 tasks"},
		{"not kernel", func(mem []byte) {
			binary.LittleEndian.PutUint64(mem[1*fuzzTask+fTasks:], 0x1000)
		}, 2, "not a kernel address"},
	} {
		t.Run(c.name, func(t *testing.T) {
			mem := forgedTasks(5)
			c.edit(mem)
			ps, err := processes(fuzzKernel(mem), fuzzOffsets(), fuzzBase, ProcessOptions{Threads: true})
			var pe *PartialError
			if !errors.As(err, &pe) {
				t.Fatalf("err %v (%T), want *PartialError", err, err)
			}
			if len(ps) != c.n || !strings.Contains(err.Error(), c.words) {
				t.Fatalf("%d tasks, err %q; want %d tasks and %q", len(ps), err, c.n, c.words)
			}
			for i, p := range ps {
				if p.PID != i {
					t.Errorf("task %d has pid %d", i, p.PID)
				}
			}
		})
	}
}
