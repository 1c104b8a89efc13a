package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/launch"
	"github.com/kvmscope/kvmscope/internal/testguest"
)

// events reads a VM's event log (NAME.events.jsonl next to its socket).
func events(t *testing.T, sock string) []map[string]any {
	t.Helper()
	f, err := os.Open(launch.EventsPath(sock))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var e map[string]any
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("event log line %q: %v", sc.Text(), err)
		}
		out = append(out, e)
	}
	return out
}

func writeFile(t *testing.T, name, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// The first example of docs/policy.md.
const docPolicy = `default: allow
rules:
  - name: at most two vCPUs
    ioctl: KVM_CREATE_VCPU
    match: ["vcpu_id >= 2"]
    action: deny
    errno: EPERM
  - ioctl: KVM_SET_USER_MEMORY_REGION
    action: log
`

func TestPolicyCheck(t *testing.T) {
	good := writeFile(t, "good.yaml", docPolicy)
	out, errOut, code := kvmscope(t, "policy", "check", good)
	if code != 0 || !strings.Contains(out, "ok: 2 rules") || strings.Count(out, "\n") != 1 {
		t.Errorf("check good: code %d, out %q, err %q", code, out, errOut)
	}
	if out, _, code := kvmscope(t, "policy", "check", "default"); code != 0 || !strings.Contains(out, "default log, mode enforce") {
		t.Errorf("check default: code %d, %q", code, out)
	}
	for _, tc := range []struct{ name, text, want string }{
		{"unknown ioctl", "rules:\n  - ioctl: KVM_CREATE_VCPUS\n    action: deny\n", ":2:12: ioctl: unknown request \"KVM_CREATE_VCPUS\""},
		{"bad operator", "rules:\n  - ioctl: KVM_CREATE_VCPU\n    match: [\"vcpu_id => 2\"]\n    action: deny\n", ":3:13: condition \"vcpu_id => 2\": unknown operator"},
		{"bad yaml", "rules:\n  - ioctl: KVM_RUN\n   action: deny\n", ":3: "},
	} {
		bad := writeFile(t, "bad.yaml", tc.text)
		_, errOut, code := kvmscope(t, "policy", "check", bad)
		if code != 2 || !strings.Contains(errOut, bad+tc.want) || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
			t.Errorf("%s: code %d, stderr %q; want exit 2 and one line with %q", tc.name, code, errOut, bad+tc.want)
		}
	}
}

// An invalid policy refuses to start the VM: no QEMU runs, exit 2.
func TestRunRefusesBadPolicy(t *testing.T) {
	bad := writeFile(t, "bad.yaml", "rules:\n  - ioctl: KVM_RUN\n    action: allowed\n")
	marker := filepath.Join(t.TempDir(), "ran")
	_, errOut, code := kvmscope(t, "run", "--policy", bad, "--", "sh", "-c", "touch "+marker)
	if code != 2 || !strings.Contains(errOut, bad+":3:13: action: unknown action \"allowed\"") {
		t.Errorf("run with a bad policy: code %d, stderr %q", code, errOut)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Error("the command ran under an invalid policy")
	}
}

// TestPolicyDeniesVCPU: -smp 4 under "at most two vCPUs". QEMU fails with
// its own error, kvmscope exits non-zero, and one deny event names vCPU 2.
func TestPolicyDeniesVCPU(t *testing.T) {
	pol := writeFile(t, "p.yaml", docPolicy)
	r := startRun(t, []string{"--policy", pol}, tinyGuest(t, 4, "")...)
	code := r.wait(120 * time.Second)
	if code == 0 {
		t.Fatalf("kvmscope exited 0 though QEMU could not create vCPU 2")
	}
	if !strings.Contains(r.stderr.String(), "Operation not permitted") {
		t.Errorf("QEMU's own error (EPERM creating the vCPU) missing from stderr:\n%s", r.stderr.String())
	}
	var denies []map[string]any
	for _, e := range events(t, r.sock) {
		if e["action"] == "deny" {
			denies = append(denies, e)
		}
	}
	if len(denies) != 1 {
		t.Fatalf("%d deny events, want 1: %v", len(denies), denies)
	}
	d := denies[0]
	args, _ := d["args"].(map[string]any)
	if d["ioctl"] != "KVM_CREATE_VCPU" || d["rule"] != "at most two vCPUs" || d["errno"] != "EPERM" || args["vcpu_id"] != float64(2) {
		t.Errorf("deny event = %v", d)
	}
}

// TestPolicyLogsMemoryRegions: a log rule records every region the guest
// sets up, with its decoded fields, and the guest runs as without it.
func TestPolicyLogsMemoryRegions(t *testing.T) {
	pol := writeFile(t, "p.yaml", docPolicy)
	r := startRun(t, []string{"--policy", pol}, tinyGuest(t, 2, "")...)
	c := r.client()
	waitReady(t, c)
	vm := getVM(t, c)
	ev := events(t, r.sock)
	logged := func(slot uint32, as int, gpa, size uint64) bool {
		for _, e := range ev {
			a, _ := e["args"].(map[string]any)
			if e["ioctl"] == "KVM_SET_USER_MEMORY_REGION" && e["verdict"] == "log" && e["action"] == "allow" &&
				a["slot"] == float64(slot&0xffff) && a["as_id"] == float64(as) &&
				a["guest_phys_addr"] == float64(gpa) && a["memory_size"] == float64(size) && a["userspace_addr"] != nil {
				return true
			}
		}
		return false
	}
	if len(vm.Memslots) == 0 {
		t.Fatal("no memslots")
	}
	for _, m := range vm.Memslots {
		if !logged(m.Slot, m.AddressSpace, uint64(m.GPA), uint64(m.Size)) {
			t.Errorf("memslot %+v has no log event", m)
		}
	}
	if len(vm.VCPUs) != 2 {
		t.Errorf("%d vCPUs, want 2", len(vm.VCPUs))
	}
	// The guest behaves as without the policy: it runs to its own exit.
	r2 := startRun(t, []string{"--policy", pol}, tinyGuest(t, 2, "exit=5")...)
	if code := r2.wait(60 * time.Second); code != testguest.ExitStatus(5) {
		t.Errorf("exit code %d under the policy, want QEMU's %d", code, testguest.ExitStatus(5))
	}
}

// checkNoUnseen fails for every event of a VM run under the default
// policy: each would be a request the shipped policy has not seen, or a
// refusal.
func checkNoUnseen(t *testing.T, sock string) {
	t.Helper()
	for _, e := range events(t, sock) {
		if e["kind"] == "guard" {
			continue // run --guard armed: not the policy's
		}
		t.Errorf("the default policy reported %v %v (%v): it should know every request QEMU makes here", e["verdict"], e["ioctl"], e["args"])
	}
}

// TestDefaultPolicyTiny: the shipped policy runs the tiny guest unchanged,
// and has seen everything it does.
func TestDefaultPolicyTiny(t *testing.T) {
	for _, smp := range []int{1, 2} {
		t.Run(fmt.Sprint("smp", smp), func(t *testing.T) {
			r := startRun(t, []string{"--policy", "default"}, tinyGuest(t, smp, "")...)
			c := r.client()
			waitReady(t, c)
			if vm := getVM(t, c); len(vm.VCPUs) != smp {
				t.Errorf("%d vCPUs, want %d", len(vm.VCPUs), smp)
			}
			checkNoUnseen(t, r.sock)
		})
	}
}

// TestPolicyLearn: a learned policy allows exactly what the VM did: the
// same VM under it reports nothing, and it checks.
func TestPolicyLearn(t *testing.T) {
	args := tinyGuest(t, 2, "exit=5")
	out := filepath.Join(t.TempDir(), "learned.yaml")
	qemu := needQEMU(t)
	_, errOut, code := kvmscope(t, append([]string{"policy", "learn", "-o", out, "--api", filepath.Join(t.TempDir(), "l.sock"), "--", qemu}, args...)...)
	if code != testguest.ExitStatus(5) {
		t.Fatalf("policy learn: code %d, want QEMU's %d: %s", code, testguest.ExitStatus(5), errOut)
	}
	text, err := os.ReadFile(out)
	if err != nil {
		t.Fatalf("no learned policy: %v (%s)", err, errOut)
	}
	for _, want := range []string{"KVM_CREATE_VCPU", "KVM_RUN", "KVM_SET_USER_MEMORY_REGION", "default: log"} {
		if !strings.Contains(string(text), want) {
			t.Errorf("learned policy lacks %s:\n%s", want, text)
		}
	}
	if o, e, code := kvmscope(t, "policy", "check", out); code != 0 {
		t.Fatalf("learned policy does not check: %s%s", o, e)
	}
	r := startRun(t, []string{"--policy", out}, args...)
	if code := r.wait(60 * time.Second); code != testguest.ExitStatus(5) {
		t.Errorf("under the learned policy: exit %d", code)
	}
	for _, e := range events(t, r.sock) {
		t.Errorf("the learned policy reported %v %v (%v)", e["verdict"], e["ioctl"], e["args"])
	}
}

// TestPolicyKill: a kill rule ends QEMU at the call, before the kernel sees
// it; kvmscope run exits non-zero (137, SIGKILL) with the rule named, and
// the kill is an event.
func TestPolicyKill(t *testing.T) {
	pol := writeFile(t, "p.yaml", "rules:\n  - name: no second vCPU\n    ioctl: KVM_CREATE_VCPU\n    match: [\"vcpu_id == 1\"]\n    action: kill\n")
	r := startRun(t, []string{"--policy", pol}, tinyGuest(t, 2, "")...)
	if code := r.wait(60 * time.Second); code != 137 {
		t.Errorf("exit code %d, want 137 (QEMU killed)", code)
	}
	if !strings.Contains(r.stderr.String(), "the ioctl policy kills QEMU") || !strings.Contains(r.stderr.String(), "no second vCPU") {
		t.Errorf("no message naming the rule on stderr:\n%s", r.stderr.String())
	}
	var kills int
	for _, e := range events(t, r.sock) {
		if e["action"] == "kill" && e["rule"] == "no second vCPU" {
			kills++
		}
	}
	if kills != 1 {
		t.Errorf("%d kill events, want 1: %v", kills, events(t, r.sock))
	}
}
