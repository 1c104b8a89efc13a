package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/api"
	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// The libvirt tests drive a real libvirtd (Debian's libvirt-daemon-system)
// with kvmscope-qemu as a domain's <emulator>. They need root: the setup
// installs libvirt when missing, prepares /run/kvmscope and starts virtlogd
// and libvirtd when they are not running (scripts/setup-libvirt.sh). The
// domain is test-only (kvmscope-test-PID) and undefined at the end.

var (
	libvirtOnce sync.Once
	libvirtErr  error
	// startedDaemons lists the pid files of the daemons the tests started,
	// to stop them at the end and leave the host as it was.
	startedDaemons []string
)

// needLibvirt prepares libvirt (once) or skips.
func needLibvirt(t *testing.T) {
	t.Helper()
	// libvirtd runs QEMU as libvirt-qemu: the tests need root.
	testenv.Require(t, testenv.Root, testenv.QEMU)
	if testenv.InLab() {
		testenv.Check(t, testenv.Libvirt, errors.New("L1 has no libvirt packages; its initramfs carries only QEMU"))
	}
	libvirtOnce.Do(func() {
		running := map[string]bool{}
		for _, d := range []string{"virtlogd", "libvirtd"} {
			running[d] = exec.Command("pgrep", "-x", d).Run() == nil
		}
		out, err := exec.Command("../../scripts/setup-libvirt.sh", "--start").CombinedOutput()
		for _, d := range []string{"libvirtd", "virtlogd"} {
			if !running[d] && exec.Command("pgrep", "-x", d).Run() == nil {
				startedDaemons = append(startedDaemons, "/run/"+d+".pid")
			}
		}
		if err != nil {
			libvirtErr = fmt.Errorf("scripts/setup-libvirt.sh --start: %v\n%s", err, out)
		}
	})
	testenv.Check(t, testenv.Libvirt, libvirtErr)
}

// forgetCapabilities removes libvirt's cached capabilities of the test's
// emulator binary (one file per binary path, which is new in every run).
func forgetCapabilities(emulator string) {
	files, _ := filepath.Glob("/var/cache/libvirt/qemu/capabilities/*.xml")
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.Contains(string(b), "<emulator>"+emulator+"</emulator>") {
			os.Remove(f)
		}
	}
}

// stopStartedDaemons stops the daemons needLibvirt started (by the pid in
// their pid files), libvirtd first.
func stopStartedDaemons() {
	for _, pidfile := range startedDaemons {
		b, err := os.ReadFile(pidfile)
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 1 {
			continue
		}
		syscall.Kill(pid, syscall.SIGTERM)
		for i := 0; i < 100 && alive(pid); i++ {
			time.Sleep(50 * time.Millisecond)
		}
	}
}

func virsh(t *testing.T, args ...string) result {
	t.Helper()
	return runCmd(t, exec.Command("virsh", append([]string{"-c", "qemu:///system"}, args...)...), 90*time.Second)
}

func mustVirsh(t *testing.T, args ...string) string {
	t.Helper()
	r := virsh(t, args...)
	if r.code != 0 {
		t.Fatalf("virsh %s: code %d\n%s%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// TestLibvirtCapabilities: libvirt probes the wrapper like any QEMU.
func TestLibvirtCapabilities(t *testing.T) {
	needLibvirt(t)
	start := time.Now()
	out := mustVirsh(t, "domcapabilities", "--emulatorbin", wrapperBin, "--virttype", "qemu", "--arch", "x86_64")
	if !strings.Contains(out, "<path>"+wrapperBin+"</path>") || !strings.Contains(out, "<domain>qemu</domain>") || !strings.Contains(out, "<machine>pc-") {
		t.Fatalf("domcapabilities of the wrapper:\n%s", out)
	}
	t.Logf("domcapabilities --emulatorbin kvmscope-qemu: %v", time.Since(start))
	if out := mustVirsh(t, "capabilities"); !strings.Contains(out, "<capabilities>") {
		t.Fatalf("virsh capabilities:\n%s", out)
	}
}

// domainXML is a TCG domain booting the Debian test kernel and busybox
// initramfs (guestFiles' dir), with a tap interface (libvirt opens the tap
// and passes its fd to QEMU) and emulator (kvmscope-qemu, or QEMU itself).
func domainXML(name, dir, emulator string) string {
	return fmt.Sprintf(`<domain type='qemu'>
  <name>%[1]s</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>%[2]s/vmlinuz</kernel>
    <initrd>%[2]s/initrd</initrd>
    <cmdline>console=ttyS0 panic=-1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>%[3]s</emulator>
    <interface type='ethernet'>
      <model type='virtio'/>
    </interface>
    <serial type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>
`, name, dir, emulator)
}

var guestFilesOnce sync.Once

// guestFiles copies the Debian test kernel and initramfs where libvirt-qemu
// can read them, once, and returns the directory.
func guestFiles(t *testing.T) string {
	t.Helper()
	guests := testlinux.Require(t)
	dir := filepath.Join(binDir, "guest")
	guestFilesOnce.Do(func() {
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		copyFile(t, guests.DebianKernel, filepath.Join(dir, "vmlinuz"))
		copyFile(t, guests.Initrd, filepath.Join(dir, "initrd"))
	})
	return dir
}

// defineDomain defines a test domain from xml, to be destroyed and
// undefined (its logs removed, shown when the test failed) at the end.
func defineDomain(t *testing.T, dir, name, xml, sockDir string) {
	t.Helper()
	xmlPath := filepath.Join(dir, name+".xml")
	if err := os.WriteFile(xmlPath, []byte(xml), 0o644); err != nil {
		t.Fatal(err)
	}
	r := virsh(t, "define", xmlPath)
	if r.code != 0 {
		t.Fatalf("virsh define: %s%s", r.stdout, r.stderr)
	}
	if r.stderr != "" {
		t.Errorf("virsh define warned: %s", r.stderr)
	}
	t.Cleanup(func() {
		virsh(t, "destroy", name)
		virsh(t, "undefine", name)
		os.Remove(filepath.Join(sockDir, name+".log"))
		domainLog := "/var/log/libvirt/qemu/" + name + ".log"
		if t.Failed() {
			b, _ := os.ReadFile(domainLog)
			t.Logf("domain %s log:\n%s", name, b)
		}
		os.Remove(domainLog)
	})
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// cli runs the kvmscope CLI as root.
func cli(t *testing.T, args ...string) result {
	t.Helper()
	return runCmd(t, exec.Command(kvmscopeBin, args...), 60*time.Second)
}

// TestLibvirtDomain: a domain whose <emulator> is kvmscope-qemu starts,
// runs traced, is seen from outside by its name, and ends cleanly.
func TestLibvirtDomain(t *testing.T) {
	needLibvirt(t)
	cfg, err := launch.LoadConfig(launch.DefaultConfigPath)
	if err != nil {
		t.Fatalf("this host's %s: %v", launch.DefaultConfigPath, err)
	}
	sockDir := cfg.SocketDir
	dir := guestFiles(t)
	name := fmt.Sprintf("kvmscope-test-%d", os.Getpid())
	defineDomain(t, dir, name, domainXML(name, dir, wrapperBin), sockDir)

	boot := time.Now()
	mustVirsh(t, "start", name)
	sock := filepath.Join(sockDir, name+".sock")
	waitFile(t, sock, 30*time.Second)
	t.Logf("virsh start to API socket: %v", time.Since(boot))

	var qemuPid int
	t.Run("vm", func(t *testing.T) {
		vm := waitVCPUs(t, sock, 1)
		if vm.Name != name || vm.Accel != "tcg" || vm.Pid == 0 {
			t.Fatalf("vm = %+v; want name %s, accel tcg, a pid", vm, name)
		}
		qemuPid = vm.Pid
		r := cli(t, "vm", "--vm", name)
		if r.code != 0 || !strings.Contains(r.stdout, name) {
			t.Fatalf("kvmscope vm --vm %s: code %d\n%s%s", name, r.code, r.stdout, r.stderr)
		}
	})
	if qemuPid == 0 {
		t.FailNow()
	}

	t.Run("traced as libvirt-qemu", func(t *testing.T) {
		st := procStatus(qemuPid)
		if strings.Contains(st, "TracerPid:\t0\n") {
			t.Errorf("QEMU %d is not traced", qemuPid)
		}
		u, err := user.Lookup("libvirt-qemu")
		if err == nil && !strings.Contains(st, "Uid:\t"+u.Uid+"\t") {
			t.Errorf("QEMU does not run as libvirt-qemu (uid %s):\n%s", u.Uid, st)
		}
		// libvirt's tap fd reached QEMU through the wrapper.
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", qemuPid))
		tap := false
		for _, fd := range fds {
			if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", qemuPid, fd.Name())); l == "/dev/net/tun" {
				tap = true
			}
		}
		if !tap {
			t.Errorf("QEMU has no /dev/net/tun fd: libvirt's tap fd was lost")
		}
	})

	t.Run("vcpus", func(t *testing.T) {
		// The kernel has booted once its vCPU runs in long mode in the
		// kernel half of the address space.
		deadline := time.Now().Add(60 * time.Second)
		for {
			r := cli(t, "vcpus", "--vm", name, "--json")
			var cpus []api.VCPU
			if r.code == 0 && json.Unmarshal([]byte(r.stdout), &cpus) == nil && len(cpus) == 1 &&
				cpus[0].Mode == "long" && uint64(cpus[0].RIP) >= 0xffff800000000000 {
				t.Logf("vCPU 0 in the guest kernel at %#x after %v", uint64(cpus[0].RIP), time.Since(boot))
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("kvmscope vcpus --vm %s: code %d\n%s%s", name, r.code, r.stdout, r.stderr)
			}
			time.Sleep(500 * time.Millisecond)
		}
	})

	t.Run("ps", func(t *testing.T) {
		if r := cli(t, "ps", "--help"); r.code != 0 {
			t.Skip("this kvmscope has no ps command yet")
		}
		// The test initramfs starts kvm-odd_name.x once its other
		// processes run.
		deadline := time.Now().Add(90 * time.Second)
		for {
			r := cli(t, "ps", "--vm", name)
			if r.code == 0 && strings.Contains(r.stdout, "kvm-odd_name.x") && strings.Contains(r.stdout, "kvm-uid1000") {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("kvmscope ps --vm %s: code %d\n%s%s", name, r.code, r.stdout, r.stderr)
			}
			time.Sleep(time.Second)
		}
	})

	t.Run("socket permissions", func(t *testing.T) {
		fi, err := os.Stat(sock)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o660 {
			t.Errorf("socket mode %v, want 0660", fi.Mode().Perm())
		}
		g, err := user.LookupGroup(launch.DefaultGroup)
		if err != nil {
			t.Skipf("no %s group: %v", launch.DefaultGroup, err)
		}
		gid, _ := strconv.Atoi(g.Gid)
		if st := fi.Sys().(*syscall.Stat_t); int(st.Gid) != gid {
			t.Errorf("socket group %d, want %s (%d)", st.Gid, g.Name, gid)
		}
		asNobody := func(groups ...uint32) result {
			cmd := exec.Command(kvmscopeBin, "vm", "--api", sock)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: groups}}
			return runCmd(t, cmd, 30*time.Second)
		}
		if r := asNobody(); r.code == 0 || !strings.Contains(r.stderr, "permission denied") {
			t.Errorf("uid 65534 outside group %s: code %d, %q; want permission denied", g.Name, r.code, r.stderr)
		}
		if r := asNobody(uint32(gid)); r.code != 0 || !strings.Contains(r.stdout, name) {
			t.Errorf("uid 65534 in group %s: code %d, %s%s; want the VM", g.Name, r.code, r.stdout, r.stderr)
		}
	})

	t.Run("metrics", func(t *testing.T) {
		m := getMetrics(t, sock)
		for _, want := range []string{"kvmscope_vcpus 1", `kvmscope_api_requests_total{code="200",path="/v1/vm"}`,
			"kvmscope_api_request_duration_seconds_count"} {
			if !strings.Contains(m, want) {
				t.Errorf("/metrics lacks %q", want)
			}
		}
		if v := metricValue(t, m, "kvmscope_guest_memory_bytes"); v < 512<<20 {
			t.Errorf("kvmscope_guest_memory_bytes = %v, want the guest's 512 MiB and more", v)
		}
		// ps ran before: its reads of guest memory and its scans count.
		if cli(t, "ps", "--help").code == 0 {
			if v := metricValue(t, m, "kvmscope_guest_memory_read_bytes_total"); v <= 0 {
				t.Errorf("kvmscope_guest_memory_read_bytes_total = %v after ps", v)
			}
			if !strings.Contains(m, `kvmscope_scans_total{kind="processes",result="ok"}`) || !strings.Contains(m, "kvmscope_scan_duration_seconds_count") {
				t.Errorf("/metrics has no successful process scan after ps")
			}
		}
	})

	t.Run("virsh", func(t *testing.T) {
		if x := mustVirsh(t, "dumpxml", name); !strings.Contains(x, "<emulator>"+wrapperBin+"</emulator>") || !strings.Contains(x, "<interface type='ethernet'>") {
			t.Errorf("virsh dumpxml:\n%s", x)
		}
		s := mustVirsh(t, "domstats", name)
		for _, want := range []string{"state.state=1", "vcpu.current=1", "net.count=1"} {
			if !strings.Contains(s, want) {
				t.Errorf("virsh domstats lacks %q:\n%s", want, s)
			}
		}
		// libvirt reads per-vCPU times from /proc/PID/task/TID of the pid
		// it started: non-zero only if that pid is QEMU itself (the
		// in-place launch), not a wrapper around it.
		if strings.Contains(s, "vcpu.0.time=0\n") || !strings.Contains(s, "vcpu.0.time=") {
			t.Errorf("virsh domstats: no vCPU time for vCPU 0 (does libvirt's pid run the vCPUs?):\n%s", s)
		}
		if s := mustVirsh(t, "domstate", name); strings.TrimSpace(s) != "running" {
			t.Errorf("domstate %q, want running", s)
		}
	})

	t.Run("destroy", func(t *testing.T) {
		// --graceful: SIGTERM only. The wrapper forwards it, QEMU exits
		// on its own, and libvirt sees the domain end.
		mustVirsh(t, "destroy", "--graceful", name)
		if s := mustVirsh(t, "domstate", name); strings.TrimSpace(s) != "shut off" {
			t.Errorf("domstate %q after destroy, want shut off", s)
		}
		deadline := time.Now().Add(10 * time.Second)
		for alive(qemuPid) {
			if time.Now().After(deadline) {
				t.Fatalf("QEMU %d still alive after virsh destroy", qemuPid)
			}
			time.Sleep(50 * time.Millisecond)
		}
		for {
			if _, err := os.Stat(sock); os.IsNotExist(err) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("socket %s left after the domain ended", sock)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})

	t.Run("logs", func(t *testing.T) {
		checkEventLog(t, filepath.Join(sockDir, name+".log"), name)
		b, err := os.ReadFile("/var/log/libvirt/qemu/" + name + ".log")
		if err != nil {
			t.Fatal(err)
		}
		log := string(b)
		if !strings.Contains(log, wrapperBin) {
			t.Errorf("the domain log does not show libvirt running the wrapper")
		}
		for _, l := range strings.Split(log, "\n") {
			if strings.Contains(l, "kvmscope") && (strings.Contains(l, `"level":"error"`) || strings.Contains(l, `"level":"warn"`) || strings.Contains(l, "kvmscope-qemu:")) {
				t.Errorf("domain log has a kvmscope warning or error: %s", l)
			}
		}
	})

	// Started again, the domain ends with a plain `virsh destroy` too
	// (SIGTERM, then SIGKILL to the wrapper if QEMU lingers).
	t.Run("restart and destroy", func(t *testing.T) {
		mustVirsh(t, "start", name)
		waitFile(t, sock, 30*time.Second)
		vm := waitVCPUs(t, sock, 1)
		mustVirsh(t, "destroy", name)
		deadline := time.Now().Add(10 * time.Second)
		for alive(vm.Pid) {
			if time.Now().After(deadline) {
				t.Fatalf("QEMU %d still alive after virsh destroy", vm.Pid)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}

// metricValue is the value of an unlabelled metric in Prometheus text.
func metricValue(t *testing.T, text, name string) float64 {
	t.Helper()
	for _, l := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", l, err)
			}
			return f
		}
	}
	t.Fatalf("no metric %s in /metrics", name)
	return 0
}
