package policy

import "testing"

// FuzzParse: a policy file is user input; whatever it holds, Parse
// returns a policy or an error, never panics.
func FuzzParse(f *testing.F) {
	f.Add([]byte(docExample))
	f.Add(BuiltinText())
	f.Add([]byte("rules:\n  - ioctl: [KVM_RUN, 0xae80]\n    match: [\"arg in [1, 2]\", \"arg & 0x10\"]\n    action: deny\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Parse("fuzz.yaml", b)
		if err == nil {
			p.Plan()
			p.Summary()
		}
	})
}
