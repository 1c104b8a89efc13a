package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testenv"
	"github.com/kvmscope/kvmscope/internal/testguest"
)

// TestWrapperPolicy: the policy named in the config file (relative to it)
// is enforced on a VM libvirt would start through the wrapper: QEMU fails
// creating vCPU 1 with its own error, the wrapper exits non-zero, and the
// deny is an event next to the socket.
func TestWrapperPolicy(t *testing.T) {
	qemu := needQEMU(t)
	testenv.Require(t, testenv.KVM)
	if _, err := testguest.Build(); err != nil {
		t.Fatalf("build the tiny guest: %v", err)
	}
	config, sockDir := writeConfig(t, "qemu: "+qemu+"\npolicy: one-vcpu.yaml\n")
	pol := "default: allow\nrules:\n  - name: one vCPU\n    ioctl: KVM_CREATE_VCPU\n    match: [\"vcpu_id >= 1\"]\n    action: deny\n"
	if err := os.WriteFile(filepath.Join(filepath.Dir(config), "one-vcpu.yaml"), []byte(pol), 0o644); err != nil {
		t.Fatal(err)
	}
	args := append(testguest.QEMUArgs(2, "kvm", "exit=5"), "-name", "pol")
	r := runCmd(t, wrapperCmd(config, args...), 60*time.Second)
	if r.code == 0 || !strings.Contains(r.stderr, "Operation not permitted") {
		t.Errorf("wrapper: code %d, want non-zero with QEMU's EPERM error; stderr:\n%s", r.code, r.stderr)
	}
	ev, err := os.ReadFile(filepath.Join(sockDir, "pol.events.jsonl"))
	if err != nil {
		t.Fatalf("no policy events next to the socket: %v (%v)", err, dirEntries(t, sockDir))
	}
	if n := strings.Count(string(ev), `"action":"deny"`); n != 1 || !strings.Contains(string(ev), `"vcpu_id":1`) || !strings.Contains(string(ev), `"rule":"one vCPU"`) {
		t.Errorf("%d deny events, want 1 naming vcpu_id 1:\n%s", n, ev)
	}
}

// TestWrapperRefusesBadPolicy: $KVMSCOPE_POLICY names a broken file: the
// VM does not start, exit 2, and the error names the file's line.
func TestWrapperRefusesBadPolicy(t *testing.T) {
	qemu := needQEMU(t)
	config, sockDir := writeConfig(t, "qemu: "+qemu+"\n")
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("rules:\n  - ioctl: KVM_NO_SUCH\n    action: deny\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := wrapperCmd(config, tcgArgs("badpol")...)
	cmd.Env = append(cmd.Env, "KVMSCOPE_POLICY="+bad)
	r := runCmd(t, cmd, 30*time.Second)
	if r.code != 2 || !strings.Contains(r.stderr, bad+":2:12: ioctl: unknown request \"KVM_NO_SUCH\"") {
		t.Errorf("wrapper: code %d, stderr %q; want 2 and the line", r.code, r.stderr)
	}
	if ents := dirEntries(t, sockDir); len(ents) != 0 {
		t.Errorf("the VM started under an invalid policy: %v", ents)
	}
}

// TestWrapperRefusesBadRules: the config's rules: names a file with a bad
// severity on line 3: the domain does not start, exit 2, and the error
// names the line.
func TestWrapperRefusesBadRules(t *testing.T) {
	qemu := needQEMU(t)
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.rules.yaml")
	if err := os.WriteFile(bad, []byte("rules:\n  - name: x\n    severity: urgent\n    process: {name: a}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	config, sockDir := writeConfig(t, "qemu: "+qemu+"\nrules: "+bad+"\n")
	r := runCmd(t, wrapperCmd(config, tcgArgs("badrules")...), 30*time.Second)
	if r.code != 2 || !strings.Contains(r.stderr, bad+":3:") {
		t.Errorf("wrapper: code %d, stderr %q; want 2 and line 3", r.code, r.stderr)
	}
	if ents := dirEntries(t, sockDir); len(ents) != 0 {
		t.Errorf("the VM started under an invalid rule file: %v", ents)
	}
}
