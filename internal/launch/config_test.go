package launch

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kvmscope/kvmscope/api"
)

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadConfig(t *testing.T) {
	c, err := LoadConfig(filepath.Join(t.TempDir(), "missing.yaml"))
	if err != nil || c.SocketDir != api.SystemDir || c.FailMode != FailClosed || !*c.EventLog || c.LogLevel != "info" || *c.Watchdog != DefaultWatchdog {
		t.Fatalf("missing file: %+v, %v; want the defaults", c, err)
	}
	c, err = LoadConfig(writeFile(t, ""))
	if err != nil || c.SocketDir != api.SystemDir {
		t.Fatalf("empty file: %+v, %v", c, err)
	}
	c, err = LoadConfig(writeFile(t, "# all of it\nqemu: /opt/qemu/bin/qemu-system-x86_64\nsocket_dir: /run/vmi\ngroup: vmi-readers\nfail_mode: open\nallow_write: true\nguard: true\nlog_level: debug\nevent_log: false\nwatchdog: 0s\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := Config{QEMU: "/opt/qemu/bin/qemu-system-x86_64", SocketDir: "/run/vmi", Group: "vmi-readers", FailMode: FailOpen, AllowWrite: true, LogLevel: "debug"}
	if c.QEMU != want.QEMU || c.SocketDir != want.SocketDir || c.Group != want.Group || c.FailMode != want.FailMode ||
		!c.AllowWrite || !c.Guard || c.LogLevel != want.LogLevel || *c.EventLog || *c.Watchdog != 0 {
		t.Errorf("got %+v", c)
	}
	for body, wantErr := range map[string]string{
		"fail_mode: sometimes\n": "fail_mode",
		"socket_dir: run/x\n":    "absolute",
		"sokcet_dir: /run/x\n":   "sokcet_dir", // a typo must not be ignored
		"qemu: [a\n":             "config",
		"watchdog: 10ms\n":       "watchdog: 10ms: want 0",
		"watchdog: soon\n":       "line 1",
	} {
		if _, err := LoadConfig(writeFile(t, body)); err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("config %q: err %v, want one mentioning %q", body, err, wantErr)
		}
	}
}

func TestConfigGroups(t *testing.T) {
	if g, err := (Config{Group: "4242"}).Groups(); err != nil || len(g) != 1 || g[0] != 4242 {
		t.Errorf("numeric group: %v, %v", g, err)
	}
	if g, err := (Config{Group: "root"}).Groups(); err != nil || len(g) != 1 || g[0] != 0 {
		t.Errorf("group root: %v, %v", g, err)
	}
	if _, err := (Config{Group: "no-such-group-kvmscope"}).Groups(); err == nil {
		t.Errorf("unknown group: no error")
	}
}

func TestFindQEMU(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	t.Setenv("KVMSCOPE_QEMU", "")
	if p, err := FindQEMU(Config{QEMU: sh}, ""); err != nil || p != sh {
		t.Errorf("config qemu: %q, %v", p, err)
	}
	// The environment is more specific than the config file.
	t.Setenv("KVMSCOPE_QEMU", "true")
	if p, err := FindQEMU(Config{QEMU: sh}, ""); err != nil || filepath.Base(p) != "true" {
		t.Errorf("KVMSCOPE_QEMU=true: %q, %v", p, err)
	}
	t.Setenv("KVMSCOPE_QEMU", "/nonexistent/qemu")
	if _, err := FindQEMU(Config{}, ""); err == nil || !strings.Contains(err.Error(), "KVMSCOPE_QEMU") {
		t.Errorf("missing KVMSCOPE_QEMU binary: %v", err)
	}
	// A "real QEMU" that is the wrapper itself would recurse.
	t.Setenv("KVMSCOPE_QEMU", "")
	if _, err := FindQEMU(Config{QEMU: sh}, sh); err == nil || !strings.Contains(err.Error(), "itself") {
		t.Errorf("self as QEMU: %v", err)
	}
	if _, err := os.Stat(QEMUCandidates[0]); err == nil {
		if p, err := FindQEMU(Config{}, ""); err != nil || p != QEMUCandidates[0] {
			t.Errorf("usual paths: %q, %v", p, err)
		}
	}
}

func TestFindSocket(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("KVMSCOPE_CONFIG", writeFile(t, "socket_dir: "+dir+"\n"))
	t.Setenv("XDG_RUNTIME_DIR", "")
	if got := FindSocket("vm1"); got != filepath.Join(dir, "vm1.sock") {
		t.Errorf("FindSocket with nothing there = %q, want the configured dir", got)
	}
	if d := SocketDirs(); len(d) != 2 || d[0] != dir || d[1] != "/run/kvmscope" {
		t.Errorf("SocketDirs = %q", d)
	}
}

func TestFileName(t *testing.T) {
	for in, want := range map[string]string{
		"web-1":            "web-1",
		"a/b":              "a_b",
		"../../etc/passwd": "_._.._etc_passwd",
		".hidden":          "_hidden",
		"with space":       "with space",
	} {
		if got := FileName(in); got != want {
			t.Errorf("FileName(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestRulesFile: a VM's own rules/NAME.yaml beside the config wins over
// the config's rules:, which is relative to the config file.
func TestRulesFile(t *testing.T) {
	path := writeFile(t, "rules: site.rules.yaml\nscan_interval: 30s\n")
	dir := filepath.Dir(path)
	c, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.ScanInterval.String() != "30s" {
		t.Errorf("scan_interval: %v", c.ScanInterval)
	}
	if got := c.RulesFile("web1"); got != filepath.Join(dir, "site.rules.yaml") {
		t.Errorf("rules of web1: %q, want the config's", got)
	}
	if err := os.MkdirAll(filepath.Join(dir, "rules"), 0o755); err != nil {
		t.Fatal(err)
	}
	own := filepath.Join(dir, "rules", "web1.yaml")
	if err := os.WriteFile(own, []byte("rules: []\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := c.RulesFile("web1"); got != own {
		t.Errorf("rules of web1: %q, want its own %q", got, own)
	}
	if got := c.RulesFile("db1"); got != filepath.Join(dir, "site.rules.yaml") {
		t.Errorf("rules of db1: %q", got)
	}
	if got := (Config{Path: path}).RulesFile("db1"); got != "" {
		t.Errorf("no rules configured: %q, want the built-in (\"\")", got)
	}
}
