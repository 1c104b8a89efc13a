package session

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// VMLoad returns a function that says how busy QEMU pid's vCPUs were
// since its previous call: the CPU time of its vCPU threads over the wall
// time, per vCPU (0 idle .. 1 every vCPU always running). QEMU names its
// vCPU threads "CPU n/KVM" (or "CPU n/TCG"); under KVM the guest's own
// run time is counted to them as user time. The first call, and a QEMU
// whose threads cannot be read, report 0.
func VMLoad(pid int) func() float64 {
	var last time.Time
	var lastCPU float64
	return func() float64 {
		cpu, n := vcpuTime(pid)
		now := time.Now()
		defer func() { last, lastCPU = now, cpu }()
		if n == 0 || last.IsZero() || cpu < lastCPU {
			return 0
		}
		return (cpu - lastCPU) / now.Sub(last).Seconds() / float64(n)
	}
}

// clockTick is USER_HZ, the unit of /proc/PID/stat's times (100 on every
// Linux architecture kvmscope runs on).
const clockTick = 100

// vcpuTime sums the user and system time, in seconds, of QEMU's vCPU
// threads, and counts them.
func vcpuTime(pid int) (float64, int) {
	dir := filepath.Join("/proc", strconv.Itoa(pid), "task")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0
	}
	var ticks uint64
	n := 0
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "stat"))
		if err != nil {
			continue
		}
		s := string(b)
		// pid (comm) state ... : comm may hold spaces and parentheses.
		open, close := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || close < open || !strings.HasPrefix(s[open+1:close], "CPU ") {
			continue
		}
		f := strings.Fields(s[close+1:])
		if len(f) < 13 {
			continue
		}
		// Fields 14 and 15 of stat (utime, stime) are 11 and 12 after comm.
		u, err1 := strconv.ParseUint(f[11], 10, 64)
		st, err2 := strconv.ParseUint(f[12], 10, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		ticks += u + st
		n++
	}
	return float64(ticks) / clockTick, n
}
