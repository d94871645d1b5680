// Certificates and keys loaded from memory / descriptors (what
// crypto-negotiate does with the files the supervisor opens for it).

import TLSTestSupport
import Foundation
import Glibc
import Testing
@testable import TLS

@Suite(.serialized) struct PEMMaterialTests {
    func material(_ cert: String, _ key: String) throws -> PEMMaterial {
        let pki = try TestPKI.get()
        return PEMMaterial(certificateChain: try PEMFile.read(path: pki.path(cert), what: "certificate"),
                           privateKey: try PEMFile.read(path: pki.path(key), what: "private key"),
                           certificateName: cert, keyName: key)
    }

    @Test func contextsFromDescriptorsServeTheirCertificate() throws {
        let pki = try TestPKI.get()
        // Descriptors whose offset is not 0 (shared with whoever opened
        // them): the content is still read whole.
        var pems: [PEMMaterial] = []
        for (cert, key) in [("leaf-ec.pem", "leaf-ec.key"), ("leaf-rsa.pem", "leaf-rsa.key")] {
            let c = open(pki.path(cert), O_RDONLY | O_CLOEXEC)
            let k = open(pki.path(key), O_RDONLY | O_CLOEXEC)
            defer { close(c); close(k) }
            lseek(c, 0, SEEK_END)
            lseek(k, 17, SEEK_SET)
            pems.append(PEMMaterial(certificateChain: try PEMFile.read(fd: c, what: cert),
                                    privateKey: try PEMFile.read(fd: k, what: key), certificateName: cert, keyName: key))
        }
        let settings = TLSServerSettings(certificates: [
            CertificateKeyPair(certificateFile: "/unused/ec.pem", keyFile: "/unused/ec.key"),
            CertificateKeyPair(certificateFile: "/unused/rsa.pem", keyFile: "/unused/rsa.key"),
        ])
        let contexts = try TLSServerContexts(settings, material: pems)
        let (ecdsa, out, _) = try ServerRoleTests.handshake(["-tls1_3"], contexts: contexts)
        _ = try ecdsa.get()
        #expect(out.contains("Verification: OK"), "\(out)")
        #expect(out.contains("Signature type: ECDSA"))
        let (rsa, rsaOut, _) = try ServerRoleTests.handshake(["-tls1_3", "-sigalgs", "rsa_pss_rsae_sha256"], contexts: contexts)
        _ = try rsa.get()
        #expect(rsaOut.contains("Signature type: RSA-PSS"), "\(rsaOut)")
    }

    @Test func aChainAfterTheLeafIsAccepted() throws {
        var pem = try material("leaf-ec.pem", "leaf-ec.key")
        pem.certificateChain += try PEMFile.read(path: TestPKI.get().path("ca.pem"), what: "ca")
        let contexts = try TLSServerContexts(TLSServerSettings(certificates: [CertificateKeyPair(certificateFile: "c", keyFile: "k")]),
                                             material: [pem])
        let (result, out, _) = try ServerRoleTests.handshake(["-tls1_3"], contexts: contexts)
        _ = try result.get()
        #expect(out.contains("Verification: OK"), "\(out)")
    }

    func loadError(_ pem: PEMMaterial) -> String? {
        do {
            _ = try TLSServerContexts(TLSServerSettings(certificates: [CertificateKeyPair(certificateFile: "c", keyFile: "k")]),
                                      material: [pem])
            return nil
        } catch {
            #expect(error.kind == .configuration)
            return error.description
        }
    }

    @Test func badMaterialIsRefusedWithItsName() throws {
        let pki = try TestPKI.get()
        var garbage = try material("leaf-ec.pem", "leaf-ec.key")
        garbage.certificateChain = Array("not a certificate\n".utf8)
        #expect(loadError(garbage)?.contains("certificate leaf-ec.pem: no PEM certificate") == true, "\(loadError(garbage) ?? "")")
        // A certificate cut short.
        var cut = try material("leaf-ec.pem", "leaf-ec.key")
        cut.certificateChain = Array(cut.certificateChain.prefix(cut.certificateChain.count / 2))
        #expect(loadError(cut) != nil)
        // Junk after the leaf where a chain certificate should be.
        var junk = try material("leaf-ec.pem", "leaf-ec.key")
        junk.certificateChain += Array("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".utf8)
        #expect(loadError(junk)?.contains("bad chain certificate") == true, "\(loadError(junk) ?? "")")
        // The key of another certificate.
        let mismatch = try material("leaf-ec.pem", "other.key")
        #expect(loadError(mismatch)?.hasPrefix("private key other.key") == true, "\(loadError(mismatch) ?? "")")
        #expect(loadError(mismatch)?.contains("mismatch") == true, "\(loadError(mismatch) ?? "")")
        // An encrypted key is an error, not a passphrase prompt.
        try shell("openssl pkey -in leaf-ec.key -aes256 -passout pass:secret -out encrypted.key", in: pki.dir)
        let encrypted = try material("leaf-ec.pem", "encrypted.key")
        #expect(loadError(encrypted)?.contains("no PEM private key (or an encrypted one)") == true)
        // The right count of pairs.
        #expect(throws: TLSError.self) {
            _ = try TLSServerContexts(TLSServerSettings(certificates: [CertificateKeyPair(certificateFile: "c", keyFile: "k")]),
                                      material: [])
        }
    }

    @Test func onlyRegularNonEmptyFilesAreRead() throws {
        let pki = try TestPKI.get()
        let directory = open(pki.dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        defer { close(directory) }
        #expect(throws: TLSError.self) { _ = try PEMFile.read(fd: directory, what: "dir") }
        try shell(": > empty.pem", in: pki.dir)
        #expect(throws: TLSError.self) { _ = try PEMFile.read(path: pki.path("empty.pem"), what: "certificate") }
        #expect(throws: TLSError.self) { _ = try PEMFile.read(path: pki.path("nonexistent.pem"), what: "certificate") }
    }
}
