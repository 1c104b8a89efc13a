package qmp

import (
	"strings"
	"testing"
)

func TestParseReply(t *testing.T) {
	for _, c := range []struct{ in, ret, err string }{
		{`{"return":{"running":true},"id":"libvirt-12"}` + "\n", `{"running":true}`, ""},
		{`{"return":{}}`, `{}`, ""},
		{`{"error":{"class":"CommandNotFound","desc":"The command nope has not been found"}}`, "", "QMP nope: CommandNotFound: The command nope has not been found"},
		{`{"id":"x"}`, "", "has no return"},
		{`not json`, "", "reply through virsh"},
		{``, "", "reply through virsh"},
	} {
		ret, err := parseReply("nope", []byte(c.in))
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%q: error %v, want %q", c.in, err, c.err)
			}
			continue
		}
		if err != nil || string(ret) != c.ret {
			t.Errorf("%q: %s, %v; want %s", c.in, ret, err, c.ret)
		}
	}
}

// FuzzParseReply: what virsh prints (QEMU's reply, relayed) never panics
// the parser.
func FuzzParseReply(f *testing.F) {
	f.Add([]byte(`{"return":{"running":true},"id":"libvirt-12"}`))
	f.Add([]byte(`{"error":{"class":"GenericError","desc":"x"}}`))
	f.Add([]byte(`{"return":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		ret, err := parseReply("x", b)
		if err == nil && ret == nil {
			t.Fatal("no error and no return")
		}
	})
}
