package api

import (
	"fmt"
	"io"
	"testing"

	"github.com/kvmscope/kvmscope/introspect"
)

// BenchmarkWriteProcesses is the JSON of GET /v1/processes alone
// (in-process, no socket): 5,000 processes shaped as a guest's.
func BenchmarkWriteProcesses(b *testing.B) {
	ps := make([]introspect.Process, 5000)
	for i := range ps {
		ps[i] = introspect.Process{PID: 1000 + i, TGID: 1000 + i, PPID: 1, Comm: "sleep", State: "S", Threads: 1,
			StartTime: uint64(i) * 1e6, PGD: 0x1234000 + uint64(i)<<12, Cmdline: []string{"sleep", fmt.Sprint(100000 + i)}, Task: 0xffff888001000000 + uint64(i)*0x2600}
	}
	for b.Loop() {
		WriteProcesses(io.Discard, ps)
	}
}
