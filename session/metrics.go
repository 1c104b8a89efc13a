package session

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are a session's Prometheus metrics: guest memory accessed and
// scans made. The API serves them at GET /metrics with its own.
type Metrics struct {
	// ReadBytes and WrittenBytes count guest memory accessed, by scans
	// and API requests alike; Reads counts the read calls (a batched
	// read is one call, at most one system call).
	ReadBytes, WrittenBytes, Reads prometheus.Counter
	// Errors counts failures by kind: "memory_read", "memory_write",
	// "scan", and the kinds other layers add ("api").
	Errors *prometheus.CounterVec
	// Scans counts scans by kind ("processes", "modules") and result
	// ("ok", "error"); ScanDuration times them.
	Scans        *prometheus.CounterVec
	ScanDuration *prometheus.HistogramVec
	// ScanReadBytes and ScanReads are what one scan read, by kind.
	ScanReadBytes, ScanReads *prometheus.HistogramVec
	// ScanCPU is the CPU time of one scheduled scan; LastScan what the
	// last one used and BudgetLeft what it left of its budget, by
	// resource (cpu_seconds, bytes).
	ScanCPU              prometheus.Histogram
	LastScan, BudgetLeft *prometheus.GaugeVec
}

// NewMetrics returns a session's metrics, unregistered (Collectors lists
// them for a registry).
func NewMetrics() *Metrics {
	return &Metrics{
		ReadBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmscope_guest_memory_read_bytes_total",
			Help: "Bytes read from guest physical memory.",
		}),
		WrittenBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmscope_guest_memory_written_bytes_total",
			Help: "Bytes written into guest physical memory.",
		}),
		Reads: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmscope_guest_memory_reads_total",
			Help: "Read calls on guest physical memory (a batched read is one call).",
		}),
		Errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kvmscope_errors_total",
			Help: "Failures, by kind.",
		}, []string{"kind"}),
		Scans: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kvmscope_scans_total",
			Help: "Scans of the guest, by kind and result.",
		}, []string{"kind", "result"}),
		ScanDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kvmscope_scan_duration_seconds",
			Help:    "Time a scan of the guest took, by kind.",
			Buckets: []float64{.001, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"kind"}),
		ScanReadBytes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kvmscope_scan_read_bytes",
			Help:    "Bytes of guest memory one scan read, by kind.",
			Buckets: prometheus.ExponentialBuckets(64<<10, 2, 12), // 64 KiB .. 128 MiB
		}, []string{"kind"}),
		ScanReads: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kvmscope_scan_reads",
			Help:    "Read calls on guest memory one scan made, by kind.",
			Buckets: prometheus.ExponentialBuckets(16, 2, 14), // 16 .. 131072
		}, []string{"kind"}),
		ScanCPU: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kvmscope_scheduled_scan_cpu_seconds",
			Help:    "CPU time one scheduled scan (--scan-interval) took.",
			Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1},
		}),
		LastScan: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kvmscope_scheduled_scan_last",
			Help: "What the last scheduled scan used, by resource (cpu_seconds, bytes: guest memory read).",
		}, []string{"resource"}),
		BudgetLeft: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "kvmscope_scheduled_scan_budget_left",
			Help: "What the last scheduled scan left of its budget, by resource (cpu_seconds, bytes); absent without a budget.",
		}, []string{"resource"}),
	}
}

// Collectors lists the metrics, to register.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.ReadBytes, m.WrittenBytes, m.Reads, m.Errors, m.Scans, m.ScanDuration, m.ScanReadBytes, m.ScanReads, m.ScanCPU, m.LastScan, m.BudgetLeft}
}

// scan records one scan of kind that took d and read what c counted.
func (m *Metrics) scan(kind string, d time.Duration, c *counts, err error) {
	result := "ok"
	if errors.Is(err, ErrBudget) {
		result = "partial"
	} else if err != nil {
		result = "error"
		m.Errors.WithLabelValues("scan").Inc()
	}
	m.Scans.WithLabelValues(kind, result).Inc()
	m.ScanDuration.WithLabelValues(kind).Observe(d.Seconds())
	m.ScanReadBytes.WithLabelValues(kind).Observe(float64(c.bytes.Load()))
	m.ScanReads.WithLabelValues(kind).Observe(float64(c.reads.Load()))
}

// scheduled records what one scheduled scan used (cpu: all of its CPU
// time, discovery included) against its budget b.
func (m *Metrics) scheduled(p ScanPolicy, b *budget, cpu time.Duration) {
	m.ScanCPU.Observe(cpu.Seconds())
	m.LastScan.WithLabelValues("cpu_seconds").Set(cpu.Seconds())
	m.LastScan.WithLabelValues("bytes").Set(float64(b.bytes))
	if p.MaxCPU > 0 {
		m.BudgetLeft.WithLabelValues("cpu_seconds").Set(max(0, p.MaxCPU-b.cpu()).Seconds())
	}
	if p.MaxBytes > 0 {
		m.BudgetLeft.WithLabelValues("bytes").Set(float64(max(0, p.MaxBytes-b.bytes)))
	}
}
