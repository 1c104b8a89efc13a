package kvmlab

import (
	"reflect"
	"testing"

	"github.com/kvmscope/kvmscope/internal/testenv"
)

func TestDeferred(t *testing.T) {
	const repo, mod = "/src/kvmscope", "example.org/k"
	entries := []testenv.Entry{
		{Dir: repo + "/cmd/kvmscope", Test: "TestKVMCapture/smp-1", Where: testenv.Deferred},
		{Dir: repo + "/cmd/kvmscope", Test: "TestKVMCapture/smp-4", Where: testenv.Deferred},
		{Dir: repo + "/cmd/kvmscope", Test: "TestDaemonize", Where: testenv.Deferred},
		{Dir: repo + "/cmd/kvmscope", Test: "TestGuestLinux", Where: testenv.Native},
		{Dir: repo + "/cmd/kvmscope", Test: "TestGuestLinux/debian-6.1-kvm", Where: testenv.Deferred},
		{Dir: repo + "/cmd/kvmscope", Test: "BenchmarkGuestSlowdown", Where: testenv.Deferred},
		{Dir: repo + "/guestmem", Test: "TestLiveMemfd", Where: testenv.Deferred},
		{Dir: repo + "/guestmem", Test: "TestTranslate", Where: testenv.Native},
		{Dir: repo, Test: "TestRoot", Where: testenv.Deferred},
	}
	got, err := Deferred(repo, mod, entries)
	if err != nil {
		t.Fatal(err)
	}
	want := []Job{
		{Package: mod, Run: "^(TestRoot)$"},
		{Package: mod + "/cmd/kvmscope", Run: "^$", Bench: "^(BenchmarkGuestSlowdown)$"},
		{Package: mod + "/cmd/kvmscope", Run: "^(TestDaemonize)$"},
		{Package: mod + "/cmd/kvmscope", Run: `^(TestGuestLinux)$/^(debian-6\.1-kvm)$`},
		{Package: mod + "/cmd/kvmscope", Run: "^(TestKVMCapture)$/^(smp-1|smp-4)$"},
		{Package: mod + "/guestmem", Run: "^(TestLiveMemfd)$"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Deferred:\n got %+v\nwant %+v", got, want)
	}
	if _, err := Deferred(repo, mod, []testenv.Entry{{Dir: "/elsewhere", Test: "TestX", Where: testenv.Deferred}}); err == nil {
		t.Error("a test outside the repository: no error")
	}
}

func TestParseResults(t *testing.T) {
	stream := "noise before boot\r\nKVMLAB-BOOTED 6.1.0\nKVMLAB-KVM ok\n" +
		"KVMLAB-BEGIN job0\n\x16=== RUN   TestA\n\x16--- PASS: TestA (0.01s)\n\x16PASS\n\nKVMLAB-END job0 0\n" +
		"KVMLAB-BEGIN job1\n\x16=== RUN   TestB\npanic: boom\n"
	r := parseResults([]byte(stream))
	if !r.booted || r.done || r.noKVM != "" || r.current != "job1" {
		t.Errorf("booted %v done %v noKVM %q current %q", r.booted, r.done, r.noKVM, r.current)
	}
	if s := r.jobs["job0"]; s.code != 0 || string(s.out) != "\x16=== RUN   TestA\n\x16--- PASS: TestA (0.01s)\n\x16PASS\n\n" {
		t.Errorf("job0 = %d %q", s.code, s.out)
	}
	if s := r.jobs["job1"]; s.code != -1 || string(s.out) != "\x16=== RUN   TestB\npanic: boom\n" {
		t.Errorf("job1 (cut off) = %d %q", s.code, s.out)
	}
	r = parseResults([]byte("KVMLAB-BOOTED x\nKVMLAB-NOKVM insmod kvm-amd.ko: no SVM\n"))
	if r.noKVM != "insmod kvm-amd.ko: no SVM" {
		t.Errorf("noKVM = %q", r.noKVM)
	}
	r = parseResults([]byte("KVMLAB-BOOTED x\nKVMLAB-RECORD-BEGIN\n{\"test\":\"TestA\"}\nKVMLAB-RECORD-END\nKVMLAB-DONE\n"))
	if !r.done || string(r.record) != "{\"test\":\"TestA\"}\n" {
		t.Errorf("done %v record %q", r.done, r.record)
	}
}

// A benchmark has no pass event of its own in test2json's stream: the
// binary's is its verdict, and a binary that failed fails it.
func TestVerdictsBenchmark(t *testing.T) {
	const pkg = "example.com/m/cmd/x"
	evs := func(end string) []Event {
		return []Event{
			{Action: "run", Package: pkg, Test: "BenchmarkA"},
			{Action: "output", Package: pkg, Test: "BenchmarkA", Output: "BenchmarkA \t1\t5 ns/op\n"},
			{Action: "output", Package: pkg, Output: "PASS\n"},
			{Action: end, Package: pkg},
		}
	}
	v := Verdicts("example.com/m", &Report{Results: []Result{{Job: Job{Package: pkg}, Events: evs("pass")}}})
	if len(v) != 1 || v[0].Name != "cmd/x.BenchmarkA" || v[0].Action != "pass" {
		t.Errorf("passing benchmark: %+v", v)
	}
	v = Verdicts("example.com/m", &Report{Results: []Result{{Job: Job{Package: pkg}, Events: evs("fail"), ExitCode: 1}}})
	if len(v) != 1 || v[0].Action != "fail" {
		t.Errorf("failing benchmark binary: %+v", v)
	}
}
