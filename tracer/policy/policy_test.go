package policy

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/kvmscope/kvmscope/tracer/ioctl"
)

// The first example of docs/policy.md.
const docExample = `default: allow
rules:
  - name: at most two vCPUs
    ioctl: KVM_CREATE_VCPU
    match: ["vcpu_id >= 2"]
    action: deny
    errno: EPERM
  - ioctl: KVM_SET_USER_MEMORY_REGION
    action: log
`

func cmd(t *testing.T, name string) uint32 {
	t.Helper()
	r, ok := ioctl.Lookup(name)
	if !ok {
		t.Fatalf("%s not in the catalogue", name)
	}
	return r.Cmd
}

func TestParseDocExample(t *testing.T) {
	p, err := Parse("p.yaml", []byte(docExample))
	if err != nil {
		t.Fatal(err)
	}
	if p.Default != Allow || p.Mode != Enforce || len(p.Rules) != 2 {
		t.Fatalf("policy = %+v", p)
	}
	r := p.Rules[0]
	if r.Name != "at most two vCPUs" || r.Action != Deny || r.Errno != syscall.EPERM || r.Line != 3 || len(r.Match) != 1 {
		t.Fatalf("rule 0 = %+v", r)
	}
	if got := p.Summary(); got != "2 rules (0 allow, 1 log, 1 deny, 0 kill), default allow, mode enforce" {
		t.Errorf("summary = %q", got)
	}
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		name, text, want string
	}{
		{"unknown ioctl", "rules:\n  - ioctl: KVM_NO_SUCH\n    action: deny\n", "p.yaml:2:12: ioctl: unknown request \"KVM_NO_SUCH\""},
		{"bad operator", "rules:\n  - ioctl: KVM_CREATE_VCPU\n    match: [\"vcpu_id =< 2\"]\n    action: deny\n", "p.yaml:3:13: condition \"vcpu_id =< 2\": unknown operator"},
		{"unknown field", "rules:\n  - ioctl: KVM_CREATE_VCPU\n    match: [\"slot == 2\"]\n    action: deny\n", "p.yaml:3:13: field \"slot\": KVM_CREATE_VCPU has no such field"},
		{"bad yaml", "rules:\n  - ioctl: [KVM_RUN\n    action: deny\n", "p.yaml:"},
		{"unknown key", "default: allow\nrulez: []\n", "p.yaml:2:1: unknown key \"rulez\""},
		{"bad action", "rules:\n  - ioctl: KVM_RUN\n    action: permit\n", "p.yaml:3:13: action: unknown action \"permit\""},
		{"bad errno", "rules:\n  - ioctl: KVM_RUN\n    action: deny\n    errno: ENOPE\n", "p.yaml:4:12: errno: unknown errno \"ENOPE\""},
		{"errno on allow", "rules:\n  - ioctl: KVM_RUN\n    action: allow\n    errno: EPERM\n", "p.yaml:4:12: errno: only a deny rule"},
		{"no action", "rules:\n  - ioctl: KVM_RUN\n", "p.yaml:2:5: rule rule at line 2: action: missing"},
		{"bad fd", "rules:\n  - ioctl: KVM_RUN\n    fd: vhost\n    action: deny\n", "p.yaml:3:9: fd: \"vhost\""},
		{"bad thread", "rules:\n  - ioctl: KVM_RUN\n    thread: io\n    action: deny\n", "p.yaml:3:13: thread: \"io\""},
		{"field on any", "rules:\n  - ioctl: any\n    match: [\"cap == 1\"]\n    action: deny\n", "a rule for every request can only test \"arg\""},
		{"unknown name", "rules:\n  - ioctl: KVM_ENABLE_CAP\n    match: [\"cap == KVM_CAP_NOPE\"]\n    action: deny\n", "unknown name \"KVM_CAP_NOPE\""},
		{"bad mode", "mode: strict\n", "p.yaml:1:7: mode: \"strict\""},
		{"empty", "", "p.yaml: empty policy"},
		{"twice", "default: allow\ndefault: deny\n", "p.yaml:2:1: default: given twice"},
	}
	for _, tc := range cases {
		_, err := Parse("p.yaml", []byte(tc.text))
		var pe *Error
		if err == nil || !errors.As(err, &pe) {
			t.Errorf("%s: err = %v, want a policy.Error", tc.name, err)
			continue
		}
		if !strings.HasPrefix(err.Error(), tc.want) && !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %q, want %q", tc.name, err, tc.want)
		}
		if tc.name == "bad yaml" && pe.Line == 0 {
			t.Errorf("bad yaml: no line in %q", err)
		}
	}
}

// call builds a Call whose argument decodes from fields (and fails when
// fields is nil and the rule needs them).
func call(c uint32, arg uint64, th Thread, link string, args *ioctl.Args, argsErr error) *Call {
	return &Call{Cmd: c, Arg: arg, Thread: th,
		FD:   func() (string, error) { return link, nil },
		Args: func() (*ioctl.Args, error) { return args, argsErr }}
}

type mem map[uint64][]byte

func (m mem) ReadAt(b []byte, addr uint64) error {
	for base, v := range m {
		if addr >= base && addr+uint64(len(b)) <= base+uint64(len(v)) {
			copy(b, v[addr-base:])
			return nil
		}
	}
	return errors.New("unmapped")
}

func decoded(t *testing.T, name string, arg uint64, m mem) *ioctl.Args {
	t.Helper()
	r, _ := ioctl.Lookup(name)
	a, err := r.Decode(arg, m)
	if err != nil {
		t.Fatal(err)
	}
	return &a
}

func TestDecide(t *testing.T) {
	p, err := Parse("p.yaml", []byte(`default: log
rules:
  - ioctl: KVM_CREATE_VCPU
    match: ["vcpu_id >= 2"]
    action: deny
  - ioctl: KVM_CREATE_VCPU
    action: allow
  - ioctl: KVM_SET_MSRS
    match: ["index not in [0x10, 0x11]"]
    action: kill
  - ioctl: KVM_SET_MSRS
    thread: vcpu
    action: allow
  - ioctl: KVM_RUN
    fd: /dev/vhost-net
    action: deny
    errno: ENOTTY
  - ioctl: KVM_RUN
    fd: vcpu
    action: allow
`))
	if err != nil {
		t.Fatal(err)
	}
	vcpu := cmd(t, "KVM_CREATE_VCPU")
	msrs := func(idx ...uint32) mem {
		b := make([]byte, 8+16*len(idx))
		b[0] = byte(len(idx))
		for i, x := range idx {
			b[8+16*i], b[9+16*i], b[10+16*i], b[11+16*i] = byte(x), byte(x>>8), byte(x>>16), byte(x>>24)
		}
		return mem{0x1000: b}
	}
	setMSRS := cmd(t, "KVM_SET_MSRS")
	run := cmd(t, "KVM_RUN")
	cases := []struct {
		name    string
		c       *Call
		action  Action
		verdict Action
		errno   syscall.Errno
	}{
		{"vcpu 1", call(vcpu, 1, ThreadIO, "", decoded(t, "KVM_CREATE_VCPU", 1, nil), nil), Allow, Allow, 0},
		{"vcpu 2", call(vcpu, 2, ThreadIO, "", decoded(t, "KVM_CREATE_VCPU", 2, nil), nil), Deny, Deny, syscall.EPERM},
		{"msrs seen", call(setMSRS, 0x1000, ThreadVCPU, "", decoded(t, "KVM_SET_MSRS", 0x1000, msrs(0x10, 0x11)), nil), Allow, Allow, 0},
		{"msrs one unseen", call(setMSRS, 0x1000, ThreadVCPU, "", decoded(t, "KVM_SET_MSRS", 0x1000, msrs(0x10, 0xc0000082)), nil), Kill, Kill, 0},
		{"msrs from main", call(setMSRS, 0x1000, ThreadMain, "", decoded(t, "KVM_SET_MSRS", 0x1000, msrs(0x10)), nil), Allow, Log, 0},
		{"msrs unreadable", call(setMSRS, 0x1000, ThreadVCPU, "", nil, errors.New("unreadable")), Deny, "", syscall.EPERM},
		{"run on vhost", call(run, 0, ThreadVCPU, "/dev/vhost-net", nil, nil), Deny, Deny, syscall.ENOTTY},
		{"run on vcpu", call(run, 0, ThreadVCPU, "anon_inode:kvm-vcpu:0", nil, nil), Allow, Allow, 0},
		{"run on vm", call(run, 0, ThreadVCPU, "anon_inode:kvm-vm", nil, nil), Allow, Log, 0},
	}
	for _, tc := range cases {
		d := p.Decide(tc.c)
		if d.Action != tc.action || d.Verdict != tc.verdict || d.Errno != tc.errno {
			t.Errorf("%s: decision %+v, want action %s verdict %s errno %v", tc.name, d, tc.action, tc.verdict, tc.errno)
		}
	}
	// Log mode: nothing is refused, and an undecidable call fails open.
	p.Mode = LogOnly
	if d := p.Decide(call(vcpu, 2, ThreadIO, "", decoded(t, "KVM_CREATE_VCPU", 2, nil), nil)); d.Action != Allow || d.Verdict != Deny || d.Enforced() || !d.Event() {
		t.Errorf("log mode: %+v", d)
	}
	if d := p.Decide(call(setMSRS, 0, ThreadVCPU, "", nil, errors.New("unreadable"))); d.Action != Allow || d.Err == nil || !d.Event() {
		t.Errorf("log mode, undecidable: %+v", d)
	}
}

func TestPlan(t *testing.T) {
	p, err := Parse("p.yaml", []byte(docExample))
	if err != nil {
		t.Fatal(err)
	}
	pl := p.Plan()
	if pl.TrapAll || len(pl.Trap) != 2 {
		t.Errorf("doc example plan = %+v, want the two named requests trapped", pl)
	}
	p, err = Parse("p.yaml", []byte("default: log\nrules:\n  - ioctl: [KVM_RUN, KVM_CREATE_VCPU]\n    action: allow\n  - ioctl: KVM_ENABLE_CAP\n    match: [\"cap == KVM_CAP_X86_SMM\"]\n    action: allow\n"))
	if err != nil {
		t.Fatal(err)
	}
	pl = p.Plan()
	if !pl.TrapAll || len(pl.Allow) != 2 {
		t.Errorf("allow-list plan = %+v, want trap all but KVM_RUN and KVM_CREATE_VCPU", pl)
	}
	// A conditional allow still reaches the default (log): it must stop.
	for _, c := range pl.Allow {
		if c == cmd(t, "KVM_ENABLE_CAP") {
			t.Error("KVM_ENABLE_CAP allowed in the filter though a call can reach the log default")
		}
	}
}

func TestBuiltin(t *testing.T) {
	p := Builtin()
	if p.Default != Log || p.Mode != Enforce {
		t.Errorf("default policy: default %s mode %s", p.Default, p.Mode)
	}
	pl := p.Plan()
	if !pl.TrapAll {
		t.Fatal("the default policy must log what it has not seen: every request not allowed outright stops")
	}
	if pl.Allow[0] != cmd(t, "KVM_RUN") && !contains(pl.Allow, cmd(t, "KVM_RUN")) {
		t.Error("KVM_RUN would stop in the tracer under the default policy")
	}
}

func contains(s []uint32, c uint32) bool {
	for _, x := range s {
		if x == c {
			return true
		}
	}
	return false
}

func TestLearnRoundTrip(t *testing.T) {
	var l Learner
	l.Add(cmd(t, "KVM_RUN"), ioctl.FDVCPU, nil)
	l.Add(cmd(t, "KVM_CREATE_VCPU"), ioctl.FDVM, nil)
	msrs := mem{0x1000: {1, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0}}
	msrs[0x1000] = append(msrs[0x1000], make([]byte, 12)...)
	l.Add(cmd(t, "KVM_SET_MSRS"), ioctl.FDVCPU, decoded(t, "KVM_SET_MSRS", 0x1000, msrs))
	var b strings.Builder
	if err := l.Write(&b, Log, "test"); err != nil {
		t.Fatal(err)
	}
	p, err := Parse("learned.yaml", []byte(b.String()))
	if err != nil {
		t.Fatalf("learned policy does not parse: %v\n%s", err, b.String())
	}
	run := call(cmd(t, "KVM_RUN"), 0, ThreadVCPU, "anon_inode:kvm-vcpu:0", nil, nil)
	if d := p.Decide(run); d.Verdict != Allow {
		t.Errorf("KVM_RUN on a vCPU fd: %+v\n%s", d, b.String())
	}
	run.FD = func() (string, error) { return "anon_inode:kvm-vm", nil }
	if d := p.Decide(run); d.Verdict != Log {
		t.Errorf("KVM_RUN on a VM fd (never seen): %+v", d)
	}
	m := call(cmd(t, "KVM_SET_MSRS"), 0x1000, ThreadVCPU, "anon_inode:kvm-vcpu:0", decoded(t, "KVM_SET_MSRS", 0x1000, msrs), nil)
	if d := p.Decide(m); d.Verdict != Allow {
		t.Errorf("KVM_SET_MSRS of a seen MSR: %+v\n%s", d, b.String())
	}
}

// Every complete policy in docs/policy.md checks.
func TestDocExamples(t *testing.T) {
	b, err := os.ReadFile("../../docs/policy.md")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for i, block := range strings.Split(string(b), "```yaml\n")[1:] {
		text := block[:strings.Index(block, "```")]
		if strings.HasPrefix(text, " ") {
			continue // a fragment of a rules: list
		}
		n++
		if _, err := Parse(fmt.Sprintf("docs/policy.md example %d", i+1), []byte(text)); err != nil {
			t.Error(err)
		}
	}
	if n < 2 {
		t.Errorf("%d complete examples in docs/policy.md, want the first example and the commented one", n)
	}
}
