package introspect

import "testing"

func TestBannerParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want KernelVersion
	}{
		{"Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12) #1 SMP\n", KernelVersion{6, 1, 0}},
		{"Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2026-11-16)", KernelVersion{6, 1, 192}},
		{"Linux version 5.15.0-91-generic (buildd@lcy02-amd64-045) (gcc (Ubuntu 11.4.0-1ubuntu1~22.04) 11.4.0) #101-Ubuntu SMP Tue Nov 14 13:30:08 UTC 2023 (Ubuntu 5.15.0-91.101-generic 5.15.131)", KernelVersion{5, 15, 131}},
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
