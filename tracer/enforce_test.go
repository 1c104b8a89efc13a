//go:build linux && amd64

package tracer

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/kvmscope/kvmscope/tracer/policy"
	"github.com/rs/zerolog"
)

// The policy tests trace a real process, testdata/ioctls.c, through the
// same path as QEMU: a stub (this test binary, re-executed) is seized,
// installs the filter the tracer made and executes the program, whose
// ioctls on /dev/null then stop in the tracer. No KVM is needed: the
// policy decides on the request and argument, whatever the fd.

const stubEnv = "KVMSCOPE_TRACER_TEST_STUB"

func init() {
	// The stub executes from the main goroutine, which must stay on the
	// thread the tracer seized, the thread-group leader.
	runtime.LockOSThread()
}

func TestMain(m *testing.M) {
	if argv, ok := os.LookupEnv(stubEnv); ok {
		os.Exit(stub(strings.Fields(argv)))
	}
	os.Exit(m.Run())
}

// stub waits for the filter on stdin, then becomes argv[0] under it.
func stub(argv []string) int {
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil {
		fmt.Fprintln(os.Stderr, "stub: no filter:", err)
		return 3
	}
	prog, err := DecodeFilter(strings.TrimSpace(line))
	if err == nil {
		err = ExecTraced(argv[0], argv, prog)
	}
	fmt.Fprintln(os.Stderr, "stub:", err)
	return 3
}

var (
	buildOnce sync.Once
	ioctlsBin string
	buildErr  error
)

// ioctlsProgram builds testdata/ioctls.c with gcc.
func ioctlsProgram(t testing.TB) string {
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "kvmscope-ioctls-")
		if err != nil {
			buildErr = err
			return
		}
		ioctlsBin = filepath.Join(dir, "ioctls")
		out, err := exec.Command("gcc", "-O1", "-Wall", "-pthread", "-o", ioctlsBin, "testdata/ioctls.c").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("gcc: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return ioctlsBin
}

// recorder keeps the events, in order.
type recorder struct {
	mu     sync.Mutex
	events []map[string]any
}

func (r *recorder) Append(kind string, v any) (uint64, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, err
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return 0, err
	}
	m["kind"] = kind
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, m)
	return uint64(len(r.events)), nil
}

// startTraced starts the ioctls program with args under policy p; its
// output lines come from the returned scanner.
func startTraced(tb testing.TB, p *policy.Policy, ev Events, args ...string) (*Tracer, *bufio.Scanner) {
	tb.Helper()
	bin := ioctlsProgram(tb)
	prog, err := Filter(p)
	if err != nil {
		tb.Fatal(err)
	}
	inR, inW, _ := os.Pipe()
	outR, outW, _ := os.Pipe()
	pid, err := syscall.ForkExec(os.Args[0], []string{os.Args[0]}, &syscall.ProcAttr{
		Env:   append(os.Environ(), stubEnv+"="+bin+" "+strings.Join(args, " ")),
		Files: []uintptr{inR.Fd(), outW.Fd(), 2},
	})
	inR.Close()
	outW.Close()
	if err != nil {
		tb.Fatal(err)
	}
	tr, err := Attach(pid, zerolog.New(zerolog.NewTestWriter(tb)).Level(zerolog.WarnLevel), Options{Policy: p, Events: ev})
	if err != nil {
		syscall.Kill(pid, syscall.SIGKILL)
		tb.Fatal(err)
	}
	fmt.Fprintln(inW, EncodeFilter(prog))
	inW.Close()
	tb.Cleanup(func() {
		syscall.Kill(pid, syscall.SIGKILL)
		<-tr.Done()
		outR.Close()
	})
	return tr, bufio.NewScanner(outR)
}

// traced runs the ioctls program with calls under policy p and returns
// the errno of each call, and the tracer.
func traced(t *testing.T, p *policy.Policy, ev Events, calls ...string) (map[string]int, *Tracer) {
	t.Helper()
	tr, sc := startTraced(t, p, ev, calls...)
	got := map[string]int{}
	for sc.Scan() {
		var name string
		var errno int
		if _, err := fmt.Sscanf(sc.Text(), "%s %d", &name, &errno); err != nil {
			t.Fatalf("bad line %q", sc.Text())
		}
		got[name] = errno
	}
	<-tr.Done()
	if err := tr.Err(); err != nil {
		t.Fatal(err)
	}
	return got, tr
}

func mustParse(t testing.TB, text string) *policy.Policy {
	t.Helper()
	p, err := policy.Parse("test.yaml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

const testPolicy = `
default: allow
mode: %s
rules:
  - name: at most two vCPUs
    ioctl: KVM_CREATE_VCPU
    match: ["vcpu_id >= 2"]
    action: deny
    errno: EPERM
  - name: no LSTAR
    ioctl: KVM_SET_MSRS
    match: ["index == 0xc0000082"]
    action: deny
    errno: EACCES
  - ioctl: KVM_SET_USER_MEMORY_REGION
    action: log
`

const (
	eperm  = int(syscall.EPERM)
	eacces = int(syscall.EACCES)
	efault = int(syscall.EFAULT)
	enotty = int(syscall.ENOTTY) // reached the kernel (/dev/null)
	enosys = int(syscall.ENOSYS)
)

var allCalls = []string{"vcpu1", "vcpu2", "vcpu2-highbits", "msrs-lstar", "msrs-other", "msrs-unreadable", "region-unreadable", "i386-getpid", "x32-getpid", "tcgets"}

func checkErrnos(t *testing.T, got, want map[string]int) {
	t.Helper()
	for call, w := range want {
		g, ok := got[call]
		switch {
		case !ok:
			t.Errorf("%s: no result (the program died?)", call)
		case g != w:
			t.Errorf("%s: errno %d (%v), want %d (%v)", call, g, syscall.Errno(g), w, syscall.Errno(w))
		}
	}
}

// count returns the events matching every key=value of kv.
func count(events []map[string]any, kv ...any) int {
	n := 0
	for _, e := range events {
		ok := true
		for i := 0; i+1 < len(kv); i += 2 {
			if fmt.Sprint(e[kv[i].(string)]) != fmt.Sprint(kv[i+1]) {
				ok = false
			}
		}
		if ok {
			n++
		}
	}
	return n
}

func TestPolicyEnforce(t *testing.T) {
	ev := &recorder{}
	got, tr := traced(t, mustParse(t, fmt.Sprintf(testPolicy, "enforce")), ev, allCalls...)
	checkErrnos(t, got, map[string]int{
		"vcpu1":          enotty,
		"vcpu2":          eperm,
		"vcpu2-highbits": eperm, // the upper bits do not get past the filter
		"msrs-lstar":     eacces,
		"msrs-other":     enotty,
		// An argument the policy needs but cannot read: fail closed.
		"msrs-unreadable": eperm,
		// The policy logs it; the memslot table cannot read it: EFAULT.
		"region-unreadable": efault,
		"i386-getpid":       enosys,
		"x32-getpid":        enosys,
		"tcgets":            enotty,
	})
	e := ev.events
	if n := count(e, "kind", "ioctl", "action", "deny", "ioctl", "KVM_CREATE_VCPU", "rule", "at most two vCPUs", "errno", "EPERM", "enforced", true); n != 2 {
		t.Errorf("%d deny events for vcpu_id 2, want 2: %v", n, e)
	}
	for _, x := range e {
		if x["ioctl"] == "KVM_CREATE_VCPU" && fmt.Sprint(x["args"]) != "map[arg:2 vcpu_id:2]" {
			t.Errorf("KVM_CREATE_VCPU event args = %v, want vcpu_id 2", x["args"])
		}
	}
	if n := count(e, "ioctl", "KVM_SET_MSRS", "action", "deny", "rule", "no LSTAR", "errno", "EACCES"); n != 1 {
		t.Errorf("%d LSTAR deny events, want 1: %v", n, e)
	}
	if n := count(e, "ioctl", "KVM_SET_MSRS", "action", "deny", "errno", "EPERM", "enforced", false); n != 1 {
		t.Errorf("%d fail-closed events, want 1: %v", n, e)
	}
	if n := count(e, "ioctl", "KVM_SET_USER_MEMORY_REGION", "action", "allow", "verdict", "log"); n != 1 {
		t.Errorf("%d log events for the memory region, want 1: %v", n, e)
	}
	if count(e, "kind", "abi", "abi", "i386") != 1 || count(e, "kind", "abi", "abi", "x32") != 1 {
		t.Errorf("foreign-ABI events missing: %v", e)
	}
	if len(e) != 7 {
		t.Errorf("%d events, want 7 (plain allows are not events): %v", len(e), e)
	}
	if tr.freezes == 0 {
		t.Error("no call froze the process, though the policy read pointer arguments")
	}
}

func TestPolicyLogMode(t *testing.T) {
	ev := &recorder{}
	got, _ := traced(t, mustParse(t, fmt.Sprintf(testPolicy, "log")), ev, allCalls...)
	checkErrnos(t, got, map[string]int{
		"vcpu1":           enotty,
		"vcpu2":           enotty, // logged, not enforced
		"msrs-lstar":      enotty,
		"msrs-unreadable": enotty, // fails open ...
		"i386-getpid":     enosys, // the ABIs stay closed in log mode
		"tcgets":          enotty,
	})
	e := ev.events
	if n := count(e, "ioctl", "KVM_CREATE_VCPU", "verdict", "deny", "action", "allow", "enforced", false); n != 2 {
		t.Errorf("%d unenforced deny events, want 2: %v", n, e)
	}
	// ... and says so.
	n := 0
	for _, x := range e {
		if x["ioctl"] == "KVM_SET_MSRS" && x["action"] == "allow" && strings.Contains(fmt.Sprint(x["error"]), "KVM_SET_MSRS") {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d fail-open events naming the unreadable argument, want 1: %v", n, e)
	}
}

func TestPolicyKill(t *testing.T) {
	p := mustParse(t, `
rules:
  - name: no devices
    ioctl: KVM_CREATE_DEVICE
    action: kill
`)
	ev := &recorder{}
	got, tr := traced(t, p, ev, "vcpu1", "create-device", "vcpu2")
	if _, ok := got["create-device"]; ok {
		t.Errorf("KVM_CREATE_DEVICE returned under a kill rule: %v", got)
	}
	if _, ok := got["vcpu2"]; ok {
		t.Errorf("the process ran on after the kill: %v", got)
	}
	if got["vcpu1"] != enotty {
		t.Errorf("vcpu1 = %v", got)
	}
	if st := tr.ExitStatus(); !st.Signaled() || st.Signal() != syscall.SIGKILL {
		t.Errorf("exit status %v, want killed by SIGKILL", st)
	}
	if !strings.Contains(tr.Killed(), "no devices") {
		t.Errorf("Killed() = %q, want the rule's name", tr.Killed())
	}
	if count(ev.events, "ioctl", "KVM_CREATE_DEVICE", "action", "kill") != 1 {
		t.Errorf("no kill event: %v", ev.events)
	}
}

// Without a policy the tracer still closes the foreign ABIs and lets
// every ioctl reach the kernel.
func TestNoPolicy(t *testing.T) {
	got, _ := traced(t, nil, nil, "vcpu2", "region-unreadable", "i386-getpid", "tcgets")
	checkErrnos(t, got, map[string]int{"vcpu2": enotty, "region-unreadable": efault, "i386-getpid": enosys, "tcgets": enotty})
}
