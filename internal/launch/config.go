package launch

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"gopkg.in/yaml.v3"
)

// DefaultConfigPath is the config file of the libvirt wrapper and of the
// CLI's --vm lookup. KVMSCOPE_CONFIG names another one.
const DefaultConfigPath = "/etc/kvmscope/config.yaml"

// DefaultGroup is the group allowed on the API when the config names none
// and a group of this name exists.
const DefaultGroup = "kvmscope"

// QEMUCandidates are the usual places of the real QEMU, in order (Debian
// and Fedora, then RHEL's qemu-kvm).
var QEMUCandidates = []string{
	"/usr/bin/qemu-system-x86_64",
	"/usr/local/bin/qemu-system-x86_64",
	"/usr/libexec/qemu-kvm",
	"/usr/bin/qemu-kvm",
}

// FailMode says what happens when the tracer cannot start.
type FailMode string

const (
	// FailClosed refuses to run QEMU untraced: the wrapper exits with an
	// error and the VM does not start.
	FailClosed FailMode = "closed"
	// FailOpen runs the real QEMU untraced and logs a warning.
	FailOpen FailMode = "open"
)

// Config is /etc/kvmscope/config.yaml. Every field is optional.
type Config struct {
	// QEMU is the real QEMU binary the wrapper runs.
	QEMU string `yaml:"qemu"`
	// SocketDir holds NAME.sock and NAME.log per VM (default
	// api.SystemDir).
	SocketDir string `yaml:"socket_dir"`
	// Group (a name or a number) may use the API besides root and the
	// user QEMU runs as. Default: "kvmscope" when that group exists.
	Group string `yaml:"group"`
	// FailMode is "closed" (default) or "open".
	FailMode FailMode `yaml:"fail_mode"`
	// AllowWrite lets API clients write guest memory.
	AllowWrite bool `yaml:"allow_write"`
	// Guard protects the guest's system-call dispatch from guest writes
	// once it has booted (docs/dispatch-guard.md).
	Guard bool `yaml:"guard"`
	// LogLevel is debug, info (default), warn or error.
	LogLevel string `yaml:"log_level"`
	// EventLog writes every log record to SOCKET_DIR/NAME.log (default
	// true); warnings and errors also go to stderr, which libvirt keeps in
	// the domain log.
	EventLog *bool `yaml:"event_log"`

	// Policy is the ioctl policy file QEMU runs under ("default" for the
	// shipped one; a relative path is relative to this file). The
	// environment variable KVMSCOPE_POLICY overrides it; "none" in either
	// runs without a policy.
	Policy string `yaml:"policy"`
	// Rules is the rule file every VM is judged by (docs/rules.md; a
	// relative path is relative to this file); a VM's own
	// rules/NAME.yaml next to this file wins over it. Default: the
	// built-in rules.
	Rules string `yaml:"rules"`
	// ScanInterval scans and judges every VM on this interval (0: on
	// demand only), as `kvmscope run --scan-interval` does.
	ScanInterval time.Duration `yaml:"scan_interval"`
	// Watchdog restarts a VM's analysis process when its API has not
	// answered for this long (default DefaultWatchdog; 0: never), as
	// `kvmscope run --watchdog` does.
	Watchdog *time.Duration `yaml:"watchdog"`

	// Path is the file this config was read from ("" when none).
	Path string `yaml:"-"`
}

// ConfigPath is the config file to read: $KVMSCOPE_CONFIG or the default.
func ConfigPath() string {
	if p := os.Getenv("KVMSCOPE_CONFIG"); p != "" {
		return p
	}
	return DefaultConfigPath
}

// LoadConfig reads the config file at path. A missing file gives the
// defaults; a file that does not parse, or has unknown keys, is an error.
func LoadConfig(path string) (Config, error) {
	var c Config
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return c.withDefaults(), nil
	}
	if err != nil {
		return c, fmt.Errorf("read config: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	c.Path = path
	switch c.FailMode {
	case "", FailClosed, FailOpen:
	default:
		return c, fmt.Errorf("config %s: fail_mode %q: want closed or open", path, c.FailMode)
	}
	if c.SocketDir != "" && !filepath.IsAbs(c.SocketDir) {
		return c, fmt.Errorf("config %s: socket_dir %q must be an absolute path", path, c.SocketDir)
	}
	if c.Watchdog != nil {
		if err := CheckWatchdog(*c.Watchdog); err != nil {
			return c, fmt.Errorf("config %s: watchdog: %w", path, err)
		}
	}
	return c.withDefaults(), nil
}

// PolicyFile is the policy to enforce: $KVMSCOPE_POLICY, else the
// config's policy:, with a relative path taken relative to the config
// file; "" (or "none") means no policy.
func (c Config) PolicyFile() string {
	p := c.Policy
	if env, ok := os.LookupEnv("KVMSCOPE_POLICY"); ok {
		return policyName(env, "")
	}
	return policyName(p, filepath.Dir(c.Path))
}

// RulesFile is the rule file of the VM called name: rules/NAME.yaml
// beside the config file when it exists, else the config's rules: (a
// relative path taken relative to the config file); "" for the built-in
// rules.
func (c Config) RulesFile(name string) string {
	dir := filepath.Dir(DefaultConfigPath)
	if c.Path != "" {
		dir = filepath.Dir(c.Path)
	}
	if name != "" {
		own := filepath.Join(dir, "rules", FileName(name)+".yaml")
		if _, err := os.Stat(own); err == nil {
			return own
		}
	}
	if c.Rules == "" || filepath.IsAbs(c.Rules) {
		return c.Rules
	}
	return filepath.Join(dir, c.Rules)
}

func policyName(p, base string) string {
	switch {
	case p == "" || p == "none":
		return ""
	case p == "default" || filepath.IsAbs(p) || base == "":
		return p
	}
	return filepath.Join(base, p)
}

func (c Config) withDefaults() Config {
	if c.SocketDir == "" {
		c.SocketDir = api.SystemDir
	}
	if c.FailMode == "" {
		c.FailMode = FailClosed
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.EventLog == nil {
		t := true
		c.EventLog = &t
	}
	if c.Watchdog == nil {
		d := DefaultWatchdog
		c.Watchdog = &d
	}
	return c
}

// Groups resolves Group to gids: none when unset and the default group
// does not exist.
func (c Config) Groups() ([]int, error) {
	name := c.Group
	if name == "" {
		g, err := user.LookupGroup(DefaultGroup)
		if err != nil {
			return nil, nil
		}
		name = g.Gid
	}
	if gid, err := strconv.Atoi(name); err == nil {
		return []int{gid}, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return nil, fmt.Errorf("config group %q: %w", name, err)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return nil, fmt.Errorf("config group %q: gid %q", name, g.Gid)
	}
	return []int{gid}, nil
}

// FindQEMU returns the real QEMU: $KVMSCOPE_QEMU, else the config's qemu,
// else the first of QEMUCandidates that exists. The environment comes first
// because it is the more specific setting (with libvirt it can only be set
// per domain, through <qemu:env>). self is the wrapper's own executable: a
// "real QEMU" that is the wrapper itself would recurse forever.
func FindQEMU(c Config, self string) (string, error) {
	var tried []string
	try := func(p, from string) (string, error) {
		path, err := exec.LookPath(p)
		if err != nil {
			return "", fmt.Errorf("real QEMU %q (from %s): %w", p, from, unwrapExecErr(err))
		}
		if sameFile(path, self) {
			return "", fmt.Errorf("real QEMU %q (from %s) is kvmscope-qemu itself", p, from)
		}
		return path, nil
	}
	if p := os.Getenv("KVMSCOPE_QEMU"); p != "" {
		return try(p, "KVMSCOPE_QEMU")
	}
	if c.QEMU != "" {
		return try(c.QEMU, c.Path)
	}
	for _, p := range QEMUCandidates {
		if path, err := try(p, "the usual paths"); err == nil {
			return path, nil
		}
		tried = append(tried, p)
	}
	return "", fmt.Errorf("no real QEMU found (tried %s); set qemu in %s or KVMSCOPE_QEMU", strings.Join(tried, ", "), DefaultConfigPath)
}

func sameFile(a, b string) bool {
	if b == "" {
		return false
	}
	fa, err1 := os.Stat(a)
	fb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(fa, fb)
}

// SocketDirs are the directories where a VM's socket may be, in the order
// clients look: the config's socket_dir (where kvmscope-qemu puts libvirt
// domains), then the default of `kvmscope run` ($XDG_RUNTIME_DIR/kvmscope or
// /run/kvmscope).
func SocketDirs() []string {
	dirs := []string{}
	if c, err := LoadConfig(ConfigPath()); err == nil {
		dirs = append(dirs, c.SocketDir)
	} else {
		dirs = append(dirs, api.SystemDir)
	}
	if d := api.DefaultDir(); d != dirs[0] {
		dirs = append(dirs, d)
	}
	return dirs
}

// FindSocket is the API socket of the VM called name: the first of
// SocketDirs holding NAME.sock, else the path in the first one (for the
// error message).
func FindSocket(name string) string {
	dirs := SocketDirs()
	for _, d := range dirs {
		p := SocketPath(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return p
		}
	}
	return SocketPath(dirs[0], name)
}

// SocketPath is the API socket of the VM called name in dir.
func SocketPath(dir, name string) string { return filepath.Join(dir, FileName(name)+".sock") }

// FileName is the VM name as used in socket and log file names: a name
// from QEMU's command line must not reach outside the socket directory, so
// '/' becomes '_' and a leading '.' becomes '_'.
func FileName(name string) string {
	name = strings.ReplaceAll(name, "/", "_")
	name = strings.ReplaceAll(name, "\x00", "_")
	if strings.HasPrefix(name, ".") {
		name = "_" + name[1:]
	}
	return name
}
