package api

import (
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/kvmscope/kvmscope/session"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are the Prometheus metrics of one kvmscope, served at GET
// /metrics on the API socket: the API's own (requests) and its session's
// (guest memory accessed, scans), on one registry with the Go runtime and
// process collectors.
type Metrics struct {
	Registry *prometheus.Registry

	// APIRequests counts API requests by route ("/v1/vm") and HTTP status.
	APIRequests *prometheus.CounterVec
	// APIRequestDuration times API requests by route.
	APIRequestDuration *prometheus.HistogramVec
	// Errors is the session's count of failures by kind, to which the
	// API adds "api" (5xx answers).
	Errors *prometheus.CounterVec
}

func newMetrics(sm *session.Metrics) *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		APIRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kvmscope_api_requests_total",
			Help: "API requests served, by route and HTTP status code.",
		}, []string{"path", "code"}),
		APIRequestDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kvmscope_api_request_duration_seconds",
			Help:    "Time to serve an API request, by route.",
			Buckets: []float64{.0001, .0005, .001, .005, .01, .02, .05, .1, .5, 1, 5, 30},
		}, []string{"path"}),
		Errors: sm.Errors,
	}
	m.Registry.MustRegister(m.APIRequests, m.APIRequestDuration,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.Registry.MustRegister(sm.Collectors()...)
	return m
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
