package session

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/kvmscope/kvmscope/rules"
	"golang.org/x/sys/unix"
)

// ScanPolicy is when the scheduled scans run and what one may cost, so
// that scanning never competes with the VM's own work (docs/scanning.md).
type ScanPolicy struct {
	// Interval is the time between two scans; Jitter (0..1) spreads each
	// wait over Interval*(1±Jitter), so that the VMs of one host do not
	// scan in step.
	Interval time.Duration
	Jitter   float64
	// MaxCPU and MaxBytes bound one scan: the CPU time it spends, and the
	// guest memory it reads. A scan that reaches either stops and is
	// reported as partial (0: no bound).
	MaxCPU   time.Duration
	MaxBytes int64
	// MaxDuty bounds the share of one core that scanning takes over
	// time: after a scan that used c of CPU, the next waits at least
	// c/MaxDuty - c (0: no bound).
	MaxDuty float64
	// BusyLoad backs off while the host is loaded: while the 1-minute
	// load average per CPU is above it, the wait doubles after each scan,
	// up to MaxBackoff (default 16 intervals; 0: never).
	BusyLoad   float64
	MaxBackoff time.Duration
	// BusyVM backs off the same way while the VM's vCPUs ran more than
	// this share of the time since the last scan (0..1, measured by
	// VMLoad, usually session.VMLoad of QEMU's pid; 0: never).
	BusyVM float64
	VMLoad func() float64 `json:"-"`
}

// DefaultScan is the scan policy's defaults besides the interval: 10%
// jitter and 5% of a core at most.
var DefaultScan = ScanPolicy{Jitter: 0.1, MaxDuty: 0.05}

// ApplyScanSection takes a rule file's scan: section into p, for every
// key (interval, jitter, max_cpu, max_bytes, max_duty, busy_load) that
// fixed does not say was set otherwise (a command-line flag wins).
func (p *ScanPolicy) ApplyScanSection(sec *rules.ScanSection, fixed func(key string) bool) {
	if sec == nil {
		return
	}
	use := func(key string) bool { return fixed == nil || !fixed(key) }
	if sec.Interval != nil && use("interval") {
		p.Interval = *sec.Interval
	}
	if sec.Jitter != nil && use("jitter") {
		p.Jitter = *sec.Jitter
	}
	if sec.MaxCPU != nil && use("max_cpu") {
		p.MaxCPU = *sec.MaxCPU
	}
	if sec.MaxBytes != nil && use("max_bytes") {
		p.MaxBytes = *sec.MaxBytes
	}
	if sec.MaxDuty != nil && use("max_duty") {
		p.MaxDuty = *sec.MaxDuty
	}
	if sec.BusyLoad != nil && use("busy_load") {
		p.BusyLoad = *sec.BusyLoad
	}
}

// Check reports a policy that cannot work.
func (p ScanPolicy) Check() error {
	switch {
	case p.Interval <= 0:
		return errors.New("scan interval must be positive")
	case p.Jitter < 0 || p.Jitter >= 1:
		return fmt.Errorf("scan jitter %g: want 0 to below 1", p.Jitter)
	case p.MaxCPU < 0 || p.MaxBytes < 0:
		return errors.New("scan budgets cannot be negative")
	case p.MaxDuty < 0 || p.MaxDuty > 1:
		return fmt.Errorf("scan duty cycle %g: want 0 to 1", p.MaxDuty)
	case p.BusyLoad < 0:
		return errors.New("scan busy load cannot be negative")
	case p.BusyVM < 0 || p.BusyVM > 1:
		return fmt.Errorf("scan busy VM share %g: want 0 to 1", p.BusyVM)
	}
	return nil
}

// ErrBudget is the read error of a scan that has spent its budget.
var ErrBudget = errors.New("the scan reached its budget")

// budget is what one scheduled scan (its process and module walks
// together) may still spend; the metered source checks it before each
// read. Its clock starts at the first read after discovery (discovery
// happens once per boot and is not the scan's).
type budget struct {
	maxBytes int64
	maxCPU   time.Duration
	started  bool
	cpu0     time.Duration // the scanning thread's CPU time at the start
	bytes    int64         // guest memory read so far
	reads    int64
	hit      string // which budget stopped the scan ("" none)
}

// budgetKey carries a scan's *budget in its context (Run sets it).
type budgetKey struct{}

// threadCPU is the calling thread's CPU time (the scan runs locked to its
// thread, so this is the scan's own).
func threadCPU() time.Duration {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_THREAD, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// start begins the budget's clock, once.
func (b *budget) start() {
	if b != nil && !b.started {
		b.started, b.cpu0 = true, threadCPU()
	}
}

// cpu is the CPU time spent since start.
func (b *budget) cpu() time.Duration {
	if b == nil || !b.started {
		return 0
	}
	return threadCPU() - b.cpu0
}

// add counts a read (the scan is one goroutine: no locking).
func (b *budget) add(n, calls int64) {
	if b != nil {
		b.bytes += n
		b.reads += calls
	}
}

// spent reports whether the scan may not read any more. The CPU clock is
// read every 16 read calls (getrusage costs about a microsecond).
func (b *budget) spent() bool {
	if b == nil {
		return false
	}
	if b.hit != "" {
		return true
	}
	if b.maxBytes > 0 && b.bytes >= b.maxBytes {
		b.hit = "bytes"
	} else if b.maxCPU > 0 && b.reads%16 == 0 && b.cpu() >= b.maxCPU {
		b.hit = "cpu"
	}
	return b.hit != ""
}

// scheduler turns a policy into waits.
type scheduler struct {
	p       ScanPolicy
	backoff int // doublings in force
	load    func() float64
}

// next is the wait after a scan that used cpu.
func (s *scheduler) next(cpu time.Duration) time.Duration {
	p := s.p
	d := p.Interval
	if p.Jitter > 0 {
		d = time.Duration(float64(d) * (1 + p.Jitter*(2*rand.Float64()-1)))
	}
	if p.MaxDuty > 0 {
		if min := time.Duration(float64(cpu)/p.MaxDuty) - cpu; d < min {
			d = min
		}
	}
	hostBusy := p.BusyLoad > 0 && s.load != nil && s.load() > p.BusyLoad
	vmBusy := p.BusyVM > 0 && p.VMLoad != nil && p.VMLoad() > p.BusyVM
	if p.BusyLoad > 0 || p.BusyVM > 0 {
		if hostBusy || vmBusy {
			s.backoff++
		} else {
			s.backoff = 0
		}
		if s.backoff > 0 {
			max := p.MaxBackoff
			if max <= 0 {
				max = 16 * p.Interval
			}
			b := d << min(s.backoff, 20)
			if b > max || b <= 0 {
				b = max
				s.backoff-- // no use doubling further
			}
			if b > d {
				d = b
			}
		}
	}
	return d
}

// hostLoad is the host's 1-minute load average per CPU.
func hostLoad() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	l, _ := strconv.ParseFloat(f[0], 64)
	return l / float64(runtime.NumCPU())
}
