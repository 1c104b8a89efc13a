package introspect

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// linux_banner (init/version-timestamp.c) is "Linux version <release>
// (<builder>) (<compiler>) #<n> <flags> <date>\n".
var bannerPrefix = []byte("Linux version ")

// maxBanner bounds the banner read from guest memory.
const maxBanner = 512

// parseBanner cuts a banner out of b (up to its newline or NUL) and
// parses the version that follows "Linux version ".
func parseBanner(b []byte) (string, KernelVersion, error) {
	if !bytes.HasPrefix(b, bannerPrefix) {
		return "", KernelVersion{}, fmt.Errorf("banner: no %q prefix", bannerPrefix)
	}
	b = b[:min(len(b), maxBanner)]
	if i := bytes.IndexAny(b, "\n\x00"); i >= 0 {
		b = b[:i]
	}
	for _, c := range b {
		if c < 0x20 || c > 0x7e {
			return "", KernelVersion{}, fmt.Errorf("banner: non-printable byte %#x", c)
		}
	}
	v, err := parseRelease(string(b[len(bannerPrefix):]))
	if err != nil {
		return "", KernelVersion{}, err
	}
	// Distributions name the release by their ABI ("6.1.0-56-cloud-amd64")
	// and put the upstream version later ("Debian 6.1.192-2", "Ubuntu
	// 5.15.0-91.101-generic 5.15.131"): take the highest patch level of
	// the same major.minor.
	for _, w := range strings.FieldsFunc(string(b), func(r rune) bool { return r == ' ' || r == '(' || r == ')' }) {
		if u, err := parseRelease(w); err == nil && u.Major == v.Major && u.Minor == v.Minor && u.Patch > v.Patch {
			v.Patch = u.Patch
		}
	}
	return string(b), v, nil
}

// parseRelease parses the leading "major.minor[.patch]" of a kernel
// release such as "6.1.0-56-cloud-amd64" or "7.1.2".
func parseRelease(s string) (KernelVersion, error) {
	var nums [3]int
	i := 0
	for part := 0; part < 3; part++ {
		j := i
		for j < len(s) && j-i < 6 && s[j] >= '0' && s[j] <= '9' {
			j++
		}
		if j == i {
			if part < 2 {
				return KernelVersion{}, fmt.Errorf("banner: release %.20q is not major.minor", s)
			}
			break
		}
		n, err := strconv.Atoi(s[i:j])
		if err != nil {
			return KernelVersion{}, fmt.Errorf("banner: release %.20q: %w", s, err)
		}
		nums[part] = n
		i = j
		if part < 2 {
			if i >= len(s) || s[i] != '.' {
				if part == 0 {
					return KernelVersion{}, fmt.Errorf("banner: release %.20q is not major.minor", s)
				}
				break
			}
			i++
		}
	}
	return KernelVersion{Major: nums[0], Minor: nums[1], Patch: nums[2]}, nil
}

// findBanner reads linux_banner: at its symbol when kallsyms has data
// symbols (CONFIG_KALLSYMS_ALL), else the first "Linux version" in the
// image's read-only data.
func (k *Kernel) findBanner() error {
	if va, ok := k.Symbol("linux_banner"); ok {
		b := make([]byte, maxBanner)
		if err := k.ReadVirt(b, va); err != nil {
			return fmt.Errorf("read linux_banner: %w", err)
		}
		banner, v, err := parseBanner(b)
		if err != nil {
			return fmt.Errorf("linux_banner at %#x: %w", va, err)
		}
		k.Banner, k.Version = banner, v
		k.Found["banner"] = "linux_banner"
		return nil
	}
	k.Found["banner"] = "image scan"
	img, err := k.imageBytes()
	if err != nil {
		return err
	}
	var fallback string
	var fv KernelVersion
	for off := 0; off < len(img); {
		i := bytes.Index(img[off:], bannerPrefix)
		if i < 0 {
			break
		}
		off += i
		// init/version.c keeps a weak first-link-pass banner whose build
		// number is missing ("... # SMP"); the real one has "#<n>".
		if banner, v, err := parseBanner(img[off:]); err == nil {
			if i := strings.Index(banner, " #"); i >= 0 && i+2 < len(banner) && banner[i+2] >= '0' && banner[i+2] <= '9' {
				k.Banner, k.Version = banner, v
				return nil
			}
			if fallback == "" {
				fallback, fv = banner, v
			}
		}
		off++
	}
	if fallback != "" {
		k.Banner, k.Version = fallback, fv
		return nil
	}
	return fmt.Errorf("linux_banner: %w", ErrNotFound)
}
