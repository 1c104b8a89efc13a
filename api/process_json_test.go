package api

import (
	"encoding/json"
	"testing"

	"github.com/kvmscope/kvmscope/introspect"
)

// processJSON is what encoding/json makes of p as the API sends it.
func processJSON(t testing.TB, p introspect.Process) string {
	b, err := json.Marshal(Process{Process: p, PGD: Hex64(p.PGD), Task: Hex64(p.Task)})
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestAppendProcess(t *testing.T) {
	for _, p := range []introspect.Process{
		{},
		{PID: 1, TGID: 1, PPID: 0, UID: -1, GID: -1, EUID: -1, EGID: -1, Comm: "systemd", State: "S", Threads: 1, StartTime: 1 << 63, PGD: 0x1234000, Cmdline: []string{"/sbin/init", "splash"}, Task: 0xffff888001000000},
		{Comm: "a\"b\\c<d>e&f\x00\x1f\x7f\b\f\n\r\t", State: "?", Cmdline: []string{}, KThread: true},
		{Comm: "\xff\xfe\u2028\u2029é\xe2\x82", Cmdline: []string{"", "\xc3", "ok"}},
	} {
		if got, want := string(appendProcess(nil, &p)), processJSON(t, p); got != want {
			t.Errorf("appendProcess:\n got %s\nwant %s", got, want)
		}
	}
}

// FuzzAppendProcess holds appendProcess to encoding/json for the strings
// a hostile guest controls (comm, command lines).
func FuzzAppendProcess(f *testing.F) {
	f.Add("sleep", "100000", -1, uint64(0x1000))
	f.Add("\xff<\u2028", "\x00\"", 7, uint64(0))
	f.Fuzz(func(t *testing.T, comm, arg string, id int, addr uint64) {
		p := introspect.Process{PID: id, UID: id, Comm: comm, State: comm, Cmdline: []string{arg, comm}, PGD: addr, Task: ^addr, StartTime: addr}
		if got, want := string(appendProcess(nil, &p)), processJSON(t, p); got != want {
			t.Fatalf("appendProcess:\n got %s\nwant %s", got, want)
		}
	})
}
