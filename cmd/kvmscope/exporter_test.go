package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testguest"
	dto "github.com/prometheus/client_model/go"
)

// freePort is a loopback TCP port nothing listens on (just now).
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startExporter runs `kvmscope exporter --listen 127.0.0.1:PORT --dir
// DIR` and returns its base URL once it answers.
func startExporter(t *testing.T, dir string) string {
	t.Helper()
	port := freePort(t)
	cmd := exec.Command(kvmscopeBin, "exporter", "--listen", fmt.Sprint(port), "--dir", dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		<-done
		if t.Failed() {
			t.Logf("exporter stderr:\n%s", tail(stderr.String(), 3000))
		}
	})
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	waitFor(t, 10*time.Second, "the exporter to answer", func() bool {
		select {
		case <-done:
			t.Fatalf("exporter exited: %s", stderr.String())
		default:
		}
		resp, err := http.Get(base + "/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	return base
}

func httpGet(t *testing.T, u string) []byte {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s, %v: %s", u, resp.Status, err, b)
	}
	return b
}

// exposition parses a text exposition into families by name.
func exposition(t *testing.T, b []byte) map[string]*dto.MetricFamily {
	t.Helper()
	fams, err := parseMetrics(b)
	if err != nil {
		t.Fatalf("parse exposition: %v\n%s", err, tail(string(b), 2000))
	}
	m := map[string]*dto.MetricFamily{}
	for _, f := range fams {
		m[f.GetName()] = f
	}
	return m
}

// seriesKey names a sample by its labels but vm.
func seriesKey(m *dto.Metric) string {
	var ls []string
	for _, l := range m.Label {
		if l.GetName() != vmLabel {
			ls = append(ls, l.GetName()+"="+l.GetValue())
		}
	}
	sort.Strings(ls)
	return strings.Join(ls, ",")
}

func labelOf(m *dto.Metric, name string) string {
	for _, l := range m.Label {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// sampleValue is a sample's value; a histogram's or summary's count.
func sampleValue(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Untyped != nil:
		return m.Untyped.GetValue()
	case m.Histogram != nil:
		return float64(m.Histogram.GetSampleCount())
	case m.Summary != nil:
		return float64(m.Summary.GetSampleCount())
	}
	return 0
}

// byVM is a family's samples of one VM, by seriesKey ("": those without
// a vm label, as a VM's own /metrics has them).
func byVM(f *dto.MetricFamily, vm string) map[string]*dto.Metric {
	out := map[string]*dto.Metric{}
	if f == nil {
		return out
	}
	for _, m := range f.Metric {
		if labelOf(m, vmLabel) == vm {
			out[seriesKey(m)] = m
		}
	}
	return out
}

// vmMetrics is a VM's own GET /metrics, parsed.
func vmMetrics(t *testing.T, sock string) map[string]*dto.MetricFamily {
	t.Helper()
	b, err := api.NewClient(sock).GetRaw(ctxT(t), "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	return exposition(t, b)
}

// brokenVM serves a /metrics that is no exposition on DIR/NAME.sock.
func brokenVM(t *testing.T, path string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "this is { not an exposition\n")
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
}

// TestExporter: two tiny guests, a stale socket and a socket whose
// /metrics is not an exposition, in one directory. A scrape of the
// exporter parses (expfmt); every sample has a vm label; each VM's series
// are those of its own /metrics, one family each across VMs, with values
// between those of its own /metrics just before and just after;
// kvmscope_vcpus is each VM's vCPU count; kvmscope_vm_up is 1 for the
// two, 0 for the others; the broken one counts scrape errors, the stale
// one not. A VM whose tracer is killed goes to up 0 and its series go.
func TestExporter(t *testing.T) {
	dir := t.TempDir()
	alpha := startVM(t, dir, "alpha", tinyGuest(t, 1, "")...)
	beta := startVM(t, dir, "beta", tinyGuest(t, 3, "")...)
	waitReady(t, alpha.client())
	waitReady(t, beta.client())
	staleSocket(t, filepath.Join(dir, "gone.sock"))
	brokenVM(t, filepath.Join(dir, "broken.sock"))

	if _, errOut, code := kvmscope(t, "exporter", "--dir", dir); code != 2 || !strings.Contains(errOut, "--listen") {
		t.Errorf("exporter without --listen: code %d, %q", code, errOut)
	}
	base := startExporter(t, dir)

	vms := map[string]*running{"alpha": alpha, "beta": beta}
	before := map[string]map[string]*dto.MetricFamily{}
	for name, r := range vms {
		before[name] = vmMetrics(t, r.sock)
	}
	got := exposition(t, httpGet(t, base+"/metrics"))
	after := map[string]map[string]*dto.MetricFamily{}
	for name, r := range vms {
		after[name] = vmMetrics(t, r.sock)
	}

	for name, f := range got {
		for _, m := range f.Metric {
			if labelOf(m, vmLabel) == "" {
				t.Errorf("%s{%s} has no vm label", name, seriesKey(m))
			}
		}
	}
	for vm := range vms {
		checked := 0
		for fname, bf := range before[vm] {
			gf, af := got[fname], after[vm][fname]
			if gf == nil {
				t.Errorf("%s: family %s of its /metrics is not exported", vm, fname)
				continue
			}
			if gf.GetType() != bf.GetType() {
				t.Errorf("%s: type %v, the VM says %v", fname, gf.GetType(), bf.GetType())
			}
			gs, as := byVM(gf, vm), byVM(af, "")
			for key, bm := range byVM(bf, "") {
				gm := gs[key]
				if gm == nil {
					t.Errorf("%s: %s{%s} not exported", vm, fname, key)
					continue
				}
				if !strings.HasPrefix(fname, "kvmscope_") {
					continue // go_* and process_* of the tracer move on their own
				}
				lo, v, hi := sampleValue(bm), sampleValue(gm), sampleValue(as[key])
				if v < lo || v > hi {
					t.Errorf("%s: %s{%s} = %v; its own /metrics said %v before and %v after", vm, fname, key, v, lo, hi)
				}
				checked++
			}
		}
		if checked < 10 {
			t.Errorf("%s: only %d kvmscope_* series compared", vm, checked)
		}
		t.Logf("%s: %d families, %d kvmscope_* series match its own /metrics", vm, len(before[vm]), checked)
	}
	// One family each, every VM in it.
	for fname, want := range map[string]map[string]float64{
		"kvmscope_vcpus": {"alpha": 1, "beta": 3},
		"kvmscope_vm_up": {"alpha": 1, "beta": 1, "gone": 0, "broken": 0},
	} {
		f := got[fname]
		if f == nil || len(f.Metric) != len(want) {
			t.Errorf("%s: %v; want one sample for each of %v", fname, f, want)
			continue
		}
		for _, m := range f.Metric {
			if w, ok := want[labelOf(m, vmLabel)]; !ok || sampleValue(m) != w {
				t.Errorf("%s{vm=%q} = %v; want %v", fname, labelOf(m, vmLabel), sampleValue(m), want)
			}
		}
	}
	errs := byVM(got["kvmscope_exporter_scrape_errors_total"], "broken")
	if len(errs) != 1 || sampleValue(errs[""]) < 1 || len(got["kvmscope_exporter_scrape_errors_total"].GetMetric()) != 1 {
		t.Errorf("kvmscope_exporter_scrape_errors_total: %v; want broken's only", got["kvmscope_exporter_scrape_errors_total"])
	}

	syscall.Kill(getVM(t, alpha.client()).TracerPid, syscall.SIGKILL)
	alpha.wait(20 * time.Second)
	got = exposition(t, httpGet(t, base+"/metrics"))
	up := byVM(got["kvmscope_vm_up"], "alpha")
	if len(up) != 1 || sampleValue(up[""]) != 0 || len(byVM(got["kvmscope_vcpus"], "alpha")) != 0 || len(byVM(got["kvmscope_vcpus"], "beta")) != 1 {
		t.Errorf("after alpha's tracer was killed: up %v, vcpus %v", got["kvmscope_vm_up"], got["kvmscope_vcpus"])
	}
}

func TestListenAddr(t *testing.T) {
	for in, want := range map[string]string{
		"9100": "127.0.0.1:9100", ":9100": "127.0.0.1:9100", "127.0.0.1:9100": "127.0.0.1:9100",
		"0.0.0.0:9100": "0.0.0.0:9100", "[::1]:9100": "[::1]:9100", "": "", "a:b:c": "",
	} {
		got, err := listenAddr(in)
		if (err != nil) != (want == "") || got != want {
			t.Errorf("listenAddr(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

// needPrometheus is the Prometheus server, `prometheus` on PATH (Debian:
// apt-get install prometheus).
const needPrometheus testenv.Need = "prometheus"

// TestExporterPrometheus: a real Prometheus scrapes the exporter every
// second; its query API then has one kvmscope_vcpus series per running
// VM, labelled with the VM's name and holding its vCPU count. The tiny
// guests run under TCG: what is tested is the exporter and Prometheus,
// and so the test needs no KVM (and no lab, which has no Prometheus).
func TestExporterPrometheus(t *testing.T) {
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		err = fmt.Errorf("prometheus not on PATH (apt-get install prometheus): %w", err)
	}
	testenv.Check(t, needPrometheus, err)
	testenv.Require(t, testenv.QEMU, testenv.Binutils)
	if _, err := testguest.Build(); err != nil {
		t.Fatalf("build tiny guest: %v", err)
	}
	dir := t.TempDir()
	vms := map[string]int{"alpha": 1, "beta": 2}
	for name, n := range vms {
		waitReady(t, startVM(t, dir, name, testguest.QEMUArgs(n, "tcg", "")...).client())
	}
	staleSocket(t, filepath.Join(dir, "gone.sock"))
	exp := startExporter(t, dir)

	work := t.TempDir()
	cfg := filepath.Join(work, "prometheus.yml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: kvmscope
    static_configs:
      - targets: [%q]
`, strings.TrimPrefix(exp, "http://"))), 0o644)
	port := freePort(t)
	cmd := exec.Command(prom, "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(work, "data"),
		fmt.Sprintf("--web.listen-address=127.0.0.1:%d", port))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			t.Logf("prometheus stderr:\n%s", tail(stderr.String(), 3000))
		}
	}()

	type series struct {
		Metric map[string]string `json:"metric"`
		Value  []any             `json:"value"`
	}
	query := func(q string) []series {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/api/v1/query?query=%s", port, url.QueryEscape(q)))
		if err != nil {
			return nil
		}
		defer resp.Body.Close()
		var r struct {
			Status string `json:"status"`
			Data   struct {
				Result []series `json:"result"`
			} `json:"data"`
		}
		if json.NewDecoder(resp.Body).Decode(&r) != nil || r.Status != "success" {
			return nil
		}
		return r.Data.Result
	}
	var got []series
	waitFor(t, 60*time.Second, "Prometheus to have kvmscope_vcpus of both VMs", func() bool {
		got = query("kvmscope_vcpus")
		if len(got) < len(vms) {
			time.Sleep(500 * time.Millisecond)
			return false
		}
		return true
	})
	if len(got) != len(vms) {
		t.Fatalf("kvmscope_vcpus: %+v; want one series per VM", got)
	}
	for _, s := range got {
		want, ok := vms[s.Metric["vm"]]
		if len(s.Value) != 2 {
			t.Errorf("series %+v", s)
			continue
		}
		v, _ := strconv.ParseFloat(fmt.Sprint(s.Value[1]), 64)
		if !ok || v != float64(want) || s.Metric["job"] != "kvmscope" {
			t.Errorf("kvmscope_vcpus%v = %v; want vm alpha (1) or beta (2), job kvmscope", s.Metric, v)
		}
	}
	up := map[string]string{}
	for _, s := range query("kvmscope_vm_up") {
		up[s.Metric["vm"]] = fmt.Sprint(s.Value[1])
	}
	if up["alpha"] != "1" || up["beta"] != "1" || up["gone"] != "0" || len(up) != 3 {
		t.Errorf("kvmscope_vm_up: %v; want alpha and beta 1, gone 0", up)
	}
	t.Logf("Prometheus: kvmscope_vcpus %+v", got)
}

// fakeVM serves body as its /metrics on path, as a VM's socket would.
func fakeVM(t *testing.T, path, body string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) })}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
}

// TestExporterMerge, in-process on two sockets serving expositions of
// two kvmscope versions: one family across VMs though the help texts
// differ; a label vm of a VM's own kept as exported_vm; a family whose
// type differs is kept for the first VM only.
func TestExporterMerge(t *testing.T) {
	dir := t.TempDir()
	fakeVM(t, dir+"/a.sock", "# HELP kvmscope_vcpus vCPUs of the VM.\n# TYPE kvmscope_vcpus gauge\nkvmscope_vcpus 2\n"+
		"# TYPE odd counter\nodd{vm=\"inner\"} 3\n")
	fakeVM(t, dir+"/b.sock", "# HELP kvmscope_vcpus Number of vCPUs.\n# TYPE kvmscope_vcpus gauge\nkvmscope_vcpus 4\n"+
		"# TYPE odd gauge\nodd 5\n")
	fams, err := newExporter([]string{dir}, 2, time.Second).Gather()
	if err == nil || !strings.Contains(err.Error(), "odd") {
		t.Errorf("Gather: %v; want the type conflict of odd", err)
	}
	got := map[string]*dto.MetricFamily{}
	for _, f := range fams {
		got[f.GetName()] = f
	}
	vc := got["kvmscope_vcpus"]
	if vc.GetHelp() != "vCPUs of the VM." || len(vc.GetMetric()) != 2 ||
		sampleValue(byVM(vc, "a")[""]) != 2 || sampleValue(byVM(vc, "b")[""]) != 4 {
		t.Errorf("kvmscope_vcpus: %v", vc)
	}
	odd := got["odd"]
	if odd.GetType() != dto.MetricType_COUNTER || len(odd.GetMetric()) != 1 || labelOf(odd.Metric[0], "exported_vm") != "inner" || labelOf(odd.Metric[0], vmLabel) != "a" {
		t.Errorf("odd: %v; want a's counter only, its own vm label as exported_vm", odd)
	}
	if up := got["kvmscope_vm_up"]; len(up.GetMetric()) != 2 || sampleValue(byVM(up, "a")[""]) != 1 || sampleValue(byVM(up, "b")[""]) != 1 {
		t.Errorf("kvmscope_vm_up: %v", up)
	}
}
