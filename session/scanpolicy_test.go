package session

import (
	"fmt"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestScanPolicyCheck(t *testing.T) {
	ok := ScanPolicy{Interval: time.Second, Jitter: 0.1, MaxDuty: 0.05}
	if err := ok.Check(); err != nil {
		t.Errorf("%+v: %v", ok, err)
	}
	for _, bad := range []ScanPolicy{
		{},
		{Interval: time.Second, Jitter: 1},
		{Interval: time.Second, Jitter: -0.1},
		{Interval: time.Second, MaxCPU: -1},
		{Interval: time.Second, MaxBytes: -1},
		{Interval: time.Second, MaxDuty: 1.5},
		{Interval: time.Second, BusyLoad: -1},
	} {
		if bad.Check() == nil {
			t.Errorf("%+v passed the check", bad)
		}
	}
}

func TestSchedulerJitter(t *testing.T) {
	s := &scheduler{p: ScanPolicy{Interval: 10 * time.Second, Jitter: 0.2}}
	lo, hi := time.Hour, time.Duration(0)
	for range 2000 {
		d := s.next(0)
		lo, hi = min(lo, d), max(hi, d)
	}
	if lo < 8*time.Second || hi > 12*time.Second {
		t.Errorf("waits spread over [%v, %v], want within [8s, 12s]", lo, hi)
	}
	if hi-lo < 3*time.Second {
		t.Errorf("waits spread over [%v, %v]: jitter does not spread them", lo, hi)
	}
}

func TestSchedulerDutyCycle(t *testing.T) {
	s := &scheduler{p: ScanPolicy{Interval: time.Second, MaxDuty: 0.05}}
	// A scan of 200 ms at 5% of a core: the next starts 3.8 s later.
	if d := s.next(200 * time.Millisecond); d != 3800*time.Millisecond {
		t.Errorf("after 200ms of CPU: wait %v, want 3.8s", d)
	}
	// A cheap scan keeps the interval.
	if d := s.next(time.Millisecond); d != time.Second {
		t.Errorf("after 1ms of CPU: wait %v, want 1s", d)
	}
}

func TestSchedulerBackoff(t *testing.T) {
	load := 3.0
	s := &scheduler{p: ScanPolicy{Interval: time.Second, BusyLoad: 1, MaxBackoff: 5 * time.Second}, load: func() float64 { return load }}
	var got []time.Duration
	for range 5 {
		got = append(got, s.next(0))
	}
	want := []time.Duration{2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second, 5 * time.Second}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("waits under load %v, want %v", got, want)
		}
	}
	load = 0.5
	if d := s.next(0); d != time.Second {
		t.Errorf("wait once the load fell: %v, want the interval", d)
	}
}

func TestBudgetBytes(t *testing.T) {
	b := &budget{maxBytes: 4096}
	b.start()
	b.add(4000, 1)
	if b.spent() {
		t.Fatal("spent before reaching the byte budget")
	}
	b.add(100, 1)
	if !b.spent() || b.hit != "bytes" {
		t.Fatalf("after 4100 bytes of 4096: spent %v, hit %q", b.spent(), b.hit)
	}
	var none *budget
	if none.spent() {
		t.Error("no budget is never spent")
	}
}

func TestBudgetCPU(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	b := &budget{maxCPU: 20 * time.Millisecond}
	b.start()
	for end := time.Now().Add(5 * time.Second); !b.spent() && time.Now().Before(end); {
		b.add(8, 1) // a read call; the CPU clock is looked at every 16
	}
	if b.hit != "cpu" || b.cpu() < 20*time.Millisecond {
		t.Errorf("busy for %v of CPU: hit %q", b.cpu(), b.hit)
	}
}

func TestSchedulerBusyVM(t *testing.T) {
	busy := 0.95
	s := &scheduler{p: ScanPolicy{Interval: time.Second, BusyVM: 0.9, VMLoad: func() float64 { return busy }}}
	if d := s.next(0); d != 2*time.Second {
		t.Errorf("wait while the VM is busy: %v, want 2s", d)
	}
	busy = 0.2
	if d := s.next(0); d != time.Second {
		t.Errorf("wait once the VM is idle: %v, want 1s", d)
	}
}

// TestVMLoad measures a real process: this test's own busy thread, named
// as QEMU names its vCPU threads.
func TestVMLoad(t *testing.T) {
	var stop atomic.Bool
	go func() {
		runtime.LockOSThread()
		// A thread's comm is what /proc/PID/task/TID/stat shows.
		if err := setThreadName("CPU 0/KVM"); err != nil {
			t.Error(err)
		}
		for !stop.Load() { // busy, as a vCPU running guest code
		}
	}()
	defer stop.Store(true)
	load := VMLoad(os.Getpid())
	load()
	time.Sleep(500 * time.Millisecond)
	if l := load(); l < 0.5 || l > 1.2 {
		t.Errorf("a spinning vCPU thread: load %.2f, want about 1", l)
	}
}

// setThreadName names the calling thread, as prctl(PR_SET_NAME) would.
func setThreadName(name string) error {
	return os.WriteFile(fmt.Sprintf("/proc/self/task/%d/comm", unix.Gettid()), []byte(name), 0)
}
