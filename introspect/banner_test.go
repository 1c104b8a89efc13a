package introspect

import "testing"

func TestBannerParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want KernelVersion
	}{
		{"Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12) #1 SMP\n", KernelVersion{6, 1, 0}},
		{"Linux version 7.1.2 (gokrazy@docker) #1 SMP PREEMPT_DYNAMIC\x00", KernelVersion{7, 1, 2}},
		{"Linux version 4.19 (x) #1\n", KernelVersion{4, 19, 0}},
	} {
		_, v, err := parseBanner([]byte(tc.in))
		if err != nil || v != tc.want {
			t.Errorf("parseBanner(%q) = %v, %v; want %v", tc.in, v, err, tc.want)
		}
	}
	for _, bad := range []string{"Linux version x.y", "Linux version 6", "Linux ver", "Linux version 6.1 \x01"} {
		if _, v, err := parseBanner([]byte(bad)); err == nil {
			t.Errorf("parseBanner(%q) = %v, want an error", bad, v)
		}
	}
}
