package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/urfave/cli/v2"
	"google.golang.org/protobuf/proto"
)

// vmLabel is the label the exporter adds to every VM's samples.
const vmLabel = "vm"

func exporterCommand() *cli.Command {
	return &cli.Command{
		Name:  "exporter",
		Usage: "serve every VM's metrics on one HTTP endpoint (/metrics), each sample labelled vm=\"NAME\"",
		Flags: []cli.Flag{dirFlag,
			&cli.StringFlag{Name: "listen", Usage: "address to serve on, HOST:PORT; a PORT or :PORT alone listens on 127.0.0.1 (required)"},
			&cli.IntFlag{Name: "jobs", Value: 4, Usage: "how many VMs are scraped at once"},
			&cli.DurationFlag{Name: "timeout", Value: 3 * time.Second, Usage: "how long to wait for each VM's /metrics"},
		},
		Action: func(c *cli.Context) error {
			addr, err := listenAddr(c.String("listen"))
			if err != nil {
				return cli.Exit(err.Error(), 2)
			}
			if c.Int("jobs") < 1 {
				return cli.Exit(fmt.Sprintf("bad --jobs %d: want 1 or more", c.Int("jobs")), 2)
			}
			for _, d := range c.StringSlice("dir") {
				if _, err := os.Stat(d); err != nil {
					return cli.Exit(fmt.Sprintf("--dir %s: %v", d, errors.Unwrap(err)), 1)
				}
			}
			x := newExporter(fleetDirs(c), c.Int("jobs"), c.Duration("timeout"))
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return cli.Exit(fmt.Sprintf("listen on %s: %v", addr, err), 1)
			}
			mux := http.NewServeMux()
			mux.Handle("GET /metrics", promhttp.HandlerFor(x, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError, ErrorLog: errorLogger{},
				// Each scrape scrapes every VM: a burst of scrapers must not multiply that.
				MaxRequestsInFlight: 4}))
			mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
				fmt.Fprintln(w, "kvmscope exporter: every VM's metrics at /metrics")
			})
			log.Info().Str("listen", ln.Addr().String()).Strs("dirs", x.dirs).Msg("serving every VM's metrics")
			srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, MaxHeaderBytes: 16 << 10}
			return srv.Serve(ln)
		},
	}
}

// listenAddr checks --listen: required; a bare port, or an empty host,
// means loopback.
func listenAddr(s string) (string, error) {
	if s == "" {
		return "", errors.New("say where to serve: --listen 127.0.0.1:PORT (metrics of every VM; loopback unless you name another address)")
	}
	if _, err := strconv.Atoi(s); err == nil {
		s = ":" + s
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", fmt.Errorf("bad --listen %q: want HOST:PORT or PORT", s)
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}

type errorLogger struct{}

func (errorLogger) Println(v ...any) { log.Warn().Msg(fmt.Sprint(v...)) }

// exporter gathers every VM's /metrics at each scrape, with the label vm
// added to every sample; families of the same name are merged across VMs.
type exporter struct {
	dirs    []string
	jobs    int
	timeout time.Duration

	// own are the exporter's metrics about itself.
	own          *prometheus.Registry
	scrapeErrors *prometheus.CounterVec
}

func newExporter(dirs []string, jobs int, timeout time.Duration) *exporter {
	x := &exporter{dirs: dirs, jobs: jobs, timeout: timeout, own: prometheus.NewRegistry(),
		scrapeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kvmscope_exporter_scrape_errors_total",
			Help: "Scrapes of a VM's /metrics by the exporter that failed (no answer in time, a bad reply; a stale socket is not counted, its kvmscope_vm_up is 0).",
		}, []string{vmLabel}),
	}
	x.own.MustRegister(x.scrapeErrors)
	return x
}

// vmScrape is one VM's metrics at one scrape.
type vmScrape struct {
	name  string
	fams  []*dto.MetricFamily
	err   error
	stale bool
}

// Gather scrapes every VM now (prometheus.Gatherer).
func (x *exporter) Gather() ([]*dto.MetricFamily, error) {
	socks, errs := api.ScanSockets(x.dirs...)
	for _, err := range errs {
		log.Warn().Err(err).Msg("exporter")
	}
	res := fanOut(socks, x.jobs, x.scrape)
	up := &dto.MetricFamily{Name: proto.String("kvmscope_vm_up"), Help: proto.String("1 if the VM's kvmscope answered the exporter's scrape, else 0."), Type: dto.MetricType_GAUGE.Enum()}
	gs := prometheus.Gatherers{}
	// VMs served by different kvmscope versions may word a family's help
	// differently; the first VM's wording is used for all, so that the
	// family still merges (one whose type differs cannot: Gatherers leaves
	// the later VM's out, and says so).
	help := map[string]*string{}
	for _, r := range res {
		for _, f := range r.fams {
			if h, ok := help[f.GetName()]; ok {
				f.Help = h
			} else {
				help[f.GetName()] = f.Help
			}
		}
	}
	for _, r := range res {
		v := 1.0
		if r.err != nil {
			v = 0
			if r.stale {
				// A VM that is down is not news at every scrape.
				log.Debug().Str("vm", r.name).Err(r.err).Msg("scrape VM")
			} else {
				x.scrapeErrors.WithLabelValues(r.name).Inc()
				log.Warn().Str("vm", r.name).Err(r.err).Msg("scrape VM")
			}
		} else {
			fams := r.fams
			gs = append(gs, prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) { return fams, nil }))
		}
		up.Metric = append(up.Metric, &dto.Metric{
			Label: []*dto.LabelPair{{Name: proto.String(vmLabel), Value: proto.String(r.name)}},
			Gauge: &dto.Gauge{Value: proto.Float64(v)},
		})
	}
	if len(up.Metric) > 0 {
		gs = append(gs, prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) { return []*dto.MetricFamily{up}, nil }))
	}
	gs = append(gs, x.own)
	return gs.Gather()
}

// scrape fetches one VM's /metrics and labels every sample with its name.
func (x *exporter) scrape(s api.FleetSocket) vmScrape {
	r := vmScrape{name: s.Name}
	if err := api.ProbeSocket(s.Path, x.timeout); err != nil {
		r.err, r.stale = err, errors.Is(err, api.ErrStale)
		return r
	}
	ctx, cancel := context.WithTimeout(context.Background(), x.timeout)
	defer cancel()
	body, err := api.NewClient(s.Path).GetRaw(ctx, "/metrics")
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("no answer within %v", x.timeout)
		}
		r.err = err
		return r
	}
	fams, err := parseMetrics(body)
	if err != nil {
		r.err = fmt.Errorf("%s/metrics: %w", s.Path, err)
		return r
	}
	for _, f := range fams {
		for _, m := range f.Metric {
			addLabel(m, vmLabel, s.Name)
		}
	}
	r.fams = fams
	return r
}

// parseMetrics parses a text exposition (what GET /metrics on a VM's
// socket serves).
func parseMetrics(b []byte) ([]*dto.MetricFamily, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	byName, err := p.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	fams := make([]*dto.MetricFamily, 0, len(byName))
	for _, f := range byName {
		fams = append(fams, f)
	}
	return fams, nil
}

// addLabel sets name=value on m. A label of that name the VM set itself
// is kept as exported_NAME, as Prometheus does with honor_labels off.
func addLabel(m *dto.Metric, name, value string) {
	for _, l := range m.Label {
		if l.GetName() == name {
			l.Name = proto.String("exported_" + name)
		}
	}
	m.Label = append(m.Label, &dto.LabelPair{Name: proto.String(name), Value: proto.String(value)})
}
