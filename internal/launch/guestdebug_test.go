package launch

import (
	"strings"
	"testing"

	"github.com/kvmscope/kvmscope/tracer/policy"
)

// TestGuestDebugRefused: the shipped policy lets QEMU's gdbstub work
// under KVM; a policy that denies or kills on KVM_SET_GUEST_DEBUG (with
// or without a condition on control, or by its default) is named in one
// line; a log-only policy refuses nothing.
func TestGuestDebugRefused(t *testing.T) {
	if err := guestDebugRefused(nil); err != nil {
		t.Errorf("no policy: %v", err)
	}
	if err := guestDebugRefused(policy.Builtin()); err != nil {
		t.Errorf("the default policy: %v", err)
	}
	for _, c := range []struct{ name, yaml, want string }{
		{"deny", "default: allow\nrules:\n  - name: no gdb\n    ioctl: KVM_SET_GUEST_DEBUG\n    action: deny\n", `deny QEMU's KVM_SET_GUEST_DEBUG (control 0x20001, rule "no gdb")`},
		{"kill", "default: allow\nrules:\n  - name: no guest debugging in production\n    ioctl: KVM_SET_GUEST_DEBUG\n    match: [\"control & KVM_GUESTDBG_ENABLE\"]\n    action: kill\n", "kill QEMU on QEMU's KVM_SET_GUEST_DEBUG (control 0x20001"},
		{"steps", "default: allow\nrules:\n  - ioctl: KVM_SET_GUEST_DEBUG\n    match: [\"control & KVM_GUESTDBG_SINGLESTEP\"]\n    action: deny\n", "control 0x100003"},
		{"default", "default: deny\nrules:\n  - ioctl: KVM_RUN\n    action: allow\n", "(control 0x20001, its default)"},
		{"vcpu thread", "default: allow\nrules:\n  - ioctl: KVM_SET_GUEST_DEBUG\n    thread: vcpu\n    fd: vcpu\n    action: deny\n", "deny"},
	} {
		p, err := policy.Parse(c.name+".yaml", []byte(c.yaml))
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		err = guestDebugRefused(p)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), c.name+".yaml") || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: %v; want one line with %q and the file", c.name, err, c.want)
		}
	}
	p, err := policy.Parse("log.yaml", []byte("default: deny\nmode: log\nrules: []\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := guestDebugRefused(p); err != nil {
		t.Errorf("a log-only policy: %v", err)
	}
}
