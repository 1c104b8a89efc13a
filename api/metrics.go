package api

import (
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are the Prometheus metrics of one kvmscope, served at GET /metrics
// on the API socket. Other features register theirs on Registry (or with
// MustRegister) and update the shared ones below.
type Metrics struct {
	Registry *prometheus.Registry

	// APIRequests counts API requests by route ("/v1/vm") and HTTP status.
	APIRequests *prometheus.CounterVec
	// APIRequestDuration times API requests by route.
	APIRequestDuration *prometheus.HistogramVec
	// GuestMemoryReadBytes counts bytes read from guest memory, by the API
	// and by introspection alike.
	GuestMemoryReadBytes prometheus.Counter
	// GuestMemoryWrittenBytes counts bytes written into guest memory.
	GuestMemoryWrittenBytes prometheus.Counter
	// Errors counts failures by kind: "api" (5xx answers), "memory_read",
	// "memory_write", "scan", and whatever later features add.
	Errors *prometheus.CounterVec
	// Scans counts scans of the guest by kind ("processes", ...) and
	// result ("ok" or "error"); ScanDuration times them.
	Scans        *prometheus.CounterVec
	ScanDuration *prometheus.HistogramVec
}

// NewMetrics returns the standard metrics on a fresh registry, with the Go
// runtime and process collectors.
func NewMetrics() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		APIRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kvmscope_api_requests_total",
			Help: "API requests served, by route and HTTP status code.",
		}, []string{"path", "code"}),
		APIRequestDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kvmscope_api_request_duration_seconds",
			Help:    "Time to serve an API request, by route.",
			Buckets: []float64{.0001, .0005, .001, .005, .01, .05, .1, .5, 1, 5, 30},
		}, []string{"path"}),
		GuestMemoryReadBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmscope_guest_memory_read_bytes_total",
			Help: "Bytes read from guest physical memory.",
		}),
		GuestMemoryWrittenBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kvmscope_guest_memory_written_bytes_total",
			Help: "Bytes written into guest physical memory.",
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
			Buckets: []float64{.001, .005, .01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"kind"}),
	}
	m.Registry.MustRegister(
		m.APIRequests, m.APIRequestDuration,
		m.GuestMemoryReadBytes, m.GuestMemoryWrittenBytes,
		m.Errors, m.Scans, m.ScanDuration,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// MustRegister adds collectors of other features to the registry.
func (m *Metrics) MustRegister(cs ...prometheus.Collector) { m.Registry.MustRegister(cs...) }

// ObserveScan records one scan of the given kind that took d.
func (m *Metrics) ObserveScan(kind string, d time.Duration, err error) {
	result := "ok"
	if err != nil {
		result = "error"
		m.Errors.WithLabelValues("scan").Inc()
	}
	m.Scans.WithLabelValues(kind, result).Inc()
	m.ScanDuration.WithLabelValues(kind).Observe(d.Seconds())
}

// handler serves the registry in the Prometheus text format.
func (m *Metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}

// instrument counts and times every request. The route label is the
// ServeMux pattern that matched (set on r by the mux), so label values stay
// a small fixed set whatever paths clients send.
func (m *Metrics) instrument(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		next.ServeHTTP(sw, r)
		route := "unmatched"
		if r.Pattern != "" {
			_, p, ok := strings.Cut(r.Pattern, " ")
			if !ok {
				p = r.Pattern
			}
			route = p
		}
		m.APIRequests.WithLabelValues(route, strconv.Itoa(sw.code)).Inc()
		m.APIRequestDuration.WithLabelValues(route).Observe(time.Since(start).Seconds())
		if sw.code >= 500 {
			m.Errors.WithLabelValues("api").Inc()
		}
	})
}

// statusWriter remembers the status code a handler wrote.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	w.code = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// vmCollector reports the VM's shape at scrape time.
type vmCollector struct {
	target                 Target
	vcpus, memslots, bytes *prometheus.Desc
}

func newVMCollector(t Target) *vmCollector {
	return &vmCollector{
		target:   t,
		vcpus:    prometheus.NewDesc("kvmscope_vcpus", "vCPUs of the VM.", nil, nil),
		memslots: prometheus.NewDesc("kvmscope_memslots", "KVM memslots QEMU has set (0 under TCG).", nil, nil),
		bytes:    prometheus.NewDesc("kvmscope_guest_memory_bytes", "Bytes of guest physical memory mapped (RAM and ROM regions).", nil, nil),
	}
}

func (c *vmCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.vcpus
	ch <- c.memslots
	ch <- c.bytes
}

func (c *vmCollector) Collect(ch chan<- prometheus.Metric) {
	vm := c.target.Describe()
	var size uint64
	for _, r := range vm.Regions {
		size += uint64(r.Size)
	}
	ch <- prometheus.MustNewConstMetric(c.vcpus, prometheus.GaugeValue, float64(len(vm.VCPUs)))
	ch <- prometheus.MustNewConstMetric(c.memslots, prometheus.GaugeValue, float64(len(vm.Memslots)))
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(size))
}

// Meter returns src with every guest memory access counted in
// GuestMemoryReadBytes, GuestMemoryWrittenBytes and Errors. A Target's
// Source should return its sources metered, so that the API's memory reads
// and introspection (API or scheduled scans) count alike. A writable
// source stays a guestmem.Writer.
func (m *Metrics) Meter(src guestmem.Source) guestmem.Source {
	if w, ok := src.(guestmem.Writer); ok {
		return meteredWriter{meteredSource{src, m}, w}
	}
	return meteredSource{src, m}
}

type meteredSource struct {
	guestmem.Source
	m *Metrics
}

func (s meteredSource) ReadAt(p []byte, gpa int64) (int, error) {
	n, err := s.Source.ReadAt(p, gpa)
	s.m.GuestMemoryReadBytes.Add(float64(n))
	if err != nil {
		s.m.Errors.WithLabelValues("memory_read").Inc()
	}
	return n, err
}

// meteredWriter keeps the guestmem.Writer of a writable source visible.
type meteredWriter struct {
	meteredSource
	w guestmem.Writer
}

func (s meteredWriter) WriteAt(p []byte, gpa int64) (int, error) {
	n, err := s.w.WriteAt(p, gpa)
	s.m.GuestMemoryWrittenBytes.Add(float64(n))
	if err != nil {
		s.m.Errors.WithLabelValues("memory_write").Inc()
	}
	return n, err
}
