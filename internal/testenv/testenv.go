// Package testenv is the one gate of kvmscope's tests that need something of
// the machine: KVM, KVM fast enough to boot Linux, QEMU, the fetched guest
// kernels, binutils, root or libvirt. A test states what it needs with
// Require; the gate runs it, skips it with the reason, or defers it to the
// nested-KVM lab (internal/kvmlab), and writes one line per decision to the
// run record ($KVMSCOPE_RECORD), which scripts/test.sh checks: a test that
// must run and ran nowhere fails CI.
package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"testing"
)

// A Need is something a test needs of the machine.
type Need string

const (
	// KVM: /dev/kvm opens read-write, speaks API 12 and creates a VM.
	KVM Need = "kvm"
	// FastKVM: KVM runs guest kernel code fast enough to boot Linux (a
	// hardware or nested KVM, not an emulating backend). Implies KVM.
	FastKVM Need = "kvm-fast"
	// GuestDebug: KVM stops a vCPU at a hardware breakpoint set with
	// KVM_SET_GUEST_DEBUG (tracer/kvmprobe.GuestDebug), as QEMU's gdbstub
	// needs for actions inside a guest. Implies KVM. The lab's nested KVM
	// does not (docs/limitations.md): there the test is not-run.
	GuestDebug Need = "kvm-guest-debug"
	// QEMU: qemu-system-x86_64 is on PATH.
	QEMU Need = "qemu"
	// Guests: the guest kernels and initramfs of `just guests` (checked
	// by internal/testlinux, which registers the check).
	Guests Need = "guests"
	// Binutils: as, ld and objcopy, to build the tiny guest.
	Binutils Need = "binutils"
	// Root: the test runs as uid 0.
	Root Need = "root"
	// Libvirt: a libvirtd the tests can start (checked by the caller; see
	// Check).
	Libvirt Need = "libvirt"
)

// Environment variables the gate reads.
const (
	// EnvRecord names the file the gate appends its decisions to.
	EnvRecord = "KVMSCOPE_RECORD"
	// EnvLab=1 sends the KVM tests to the lab even where /dev/kvm works,
	// so the lab path can be tested anywhere.
	EnvLab = "KVMSCOPE_LAB"
	// EnvInLab=1 is set by the lab's init inside L1.
	EnvInLab = "KVMSCOPE_IN_LAB"
)

// Where a test ran, in the record.
const (
	Native   = "native"   // here, with everything it needs
	Lab      = "lab"      // inside the nested-KVM lab's L1
	Deferred = "deferred" // not here: the lab runs it
	Skipped  = "skipped"  // nowhere: something it needs is missing
	NotRun   = "not-run"  // nowhere, for a reason the project declares (docs/testing.md)
)

// InLab reports whether this process runs inside the lab's L1.
func InLab() bool { return os.Getenv(EnvInLab) == "1" }

// LabForced reports whether KVMSCOPE_LAB=1 sends KVM tests to the lab.
func LabForced() bool { return os.Getenv(EnvLab) == "1" }

// Require runs the test only when the machine has every need. Otherwise it
// skips the test, saying why and whether the lab will run it, and records
// the decision either way.
func Require(tb testing.TB, needs ...Need) {
	tb.Helper()
	decide(tb, needs, func(n Need) error { return check(n) })
}

// Check is Require for one need that the caller checked itself (err is nil
// when it is met), such as Libvirt, whose set-up only the caller knows.
func Check(tb testing.TB, n Need, err error) {
	tb.Helper()
	decide(tb, []Need{n}, func(Need) error { return err })
}

func decide(tb testing.TB, needs []Need, check func(Need) error) {
	tb.Helper()
	where, reason := Native, ""
	if InLab() {
		where = Lab
	}
	// Something other than KVM missing outranks KVM missing: the lab
	// could not run the test either.
	var kvmErr, otherErr error
	var kvmNeed, otherNeed Need
	for _, n := range needs {
		err := check(n)
		switch {
		case err == nil:
		case isKVM(n) && kvmErr == nil:
			kvmNeed, kvmErr = n, err
		case !isKVM(n) && otherErr == nil:
			otherNeed, otherErr = n, err
		}
	}
	switch {
	case otherErr != nil && InLab() && otherNeed == Libvirt:
		// Declared: libvirtd is not brought into L1 (docs/testing.md).
		where, reason = NotRun, "libvirtd does not run in the nested-KVM lab: "+otherErr.Error()
	case otherErr != nil:
		where, reason = Skipped, fmt.Sprintf("needs %s: %v", otherNeed, otherErr)
	case kvmErr != nil && InLab() && kvmNeed == GuestDebug:
		// Declared: TCG's emulated SVM, under the lab's L1, arms no
		// breakpoint of an L2's debug registers (docs/testing.md).
		where, reason = NotRun, "declared for the nested-KVM lab (docs/testing.md): "+kvmErr.Error()
	case kvmErr != nil && !InLab():
		where, reason = Deferred, fmt.Sprintf("needs %s, runs in the nested-KVM lab (just lab): %v", kvmNeed, kvmErr)
	case kvmErr != nil:
		where, reason = Skipped, fmt.Sprintf("needs %s, missing even in the lab: %v", kvmNeed, kvmErr)
	}
	write(Entry{Dir: wd(), Test: tb.Name(), Needs: needs, Where: where, Reason: reason})
	if where != Native && where != Lab {
		tb.Skip(reason)
	}
}

func isKVM(n Need) bool { return n == KVM || n == FastKVM || n == GuestDebug }

// check tells whether need n is met here; checks are done once per process.
func check(n Need) error {
	mu.Lock()
	defer mu.Unlock()
	if err, ok := checked[n]; ok {
		return err
	}
	var err error
	switch n {
	case KVM:
		err = kvmUsable()
	case FastKVM:
		if err = kvmUsable(); err == nil {
			err = kvmFast()
		}
	case GuestDebug:
		err = guestDebug()
	case QEMU:
		_, err = exec.LookPath("qemu-system-x86_64")
		if err != nil {
			err = errors.New("qemu-system-x86_64 not installed (just setup)")
		}
	case Binutils:
		for _, tool := range []string{"as", "ld", "objcopy"} {
			if _, e := exec.LookPath(tool); e != nil {
				err = fmt.Errorf("%s not installed (Debian package binutils)", tool)
				break
			}
		}
	case Root:
		if os.Geteuid() != 0 {
			err = errors.New("not root")
		}
	default:
		if f := registered[n]; f != nil {
			err = f()
		} else {
			err = fmt.Errorf("testenv: need %q has no check (use Check, or RegisterCheck)", n)
		}
	}
	if err == nil && isKVM(n) && LabForced() && !InLab() {
		err = errors.New(EnvLab + "=1 sends KVM tests to the lab")
	}
	checked[n] = err
	return err
}

var (
	mu         sync.Mutex
	checked    = map[Need]error{}
	registered = map[Need]func() error{}
)

// RegisterCheck makes f the check of need n for Require, for needs whose
// check belongs to another package (internal/testlinux checks Guests).
// Call it from an init function.
func RegisterCheck(n Need, f func() error) {
	mu.Lock()
	defer mu.Unlock()
	registered[n] = f
}

func wd() string {
	d, err := os.Getwd()
	if err != nil {
		return "?"
	}
	return d
}
