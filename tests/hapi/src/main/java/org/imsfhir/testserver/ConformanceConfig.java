package org.imsfhir.testserver;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.dao.DaoRegistry;
import ca.uhn.fhir.jpa.api.dao.IFhirResourceDao;
import ca.uhn.fhir.rest.api.server.SystemRequestDetails;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.RequestValidatingInterceptor;
import ca.uhn.fhir.validation.IValidatorModule;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Set;
import java.util.stream.Stream;
import org.apache.commons.compress.archivers.tar.TarArchiveEntry;
import org.apache.commons.compress.archivers.tar.TarArchiveInputStream;
import org.apache.commons.compress.compressors.gzip.GzipCompressorInputStream;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.context.event.ApplicationReadyEvent;
import org.springframework.context.ApplicationListener;
import org.springframework.context.annotation.Configuration;

/**
 * The hook for ims-fhir's profiles.
 *
 * <ul>
 *   <li>{@code --ims.package=FILE.tgz}: install a FHIR NPM package (as built by
 *       {@code ims-fhir package}): store its CodeSystems, ValueSets and StructureDefinitions;
 *   <li>{@code --ims.conformance-dir=DIR}: the same for the JSON files of a directory;
 *   <li>{@code --ims.validate-requests=true}: validate incoming resources (against the profiles
 *       in their meta.profile) and reject those with errors.
 * </ul>
 */
@Configuration
public class ConformanceConfig implements ApplicationListener<ApplicationReadyEvent> {

	private static final Logger LOG = LoggerFactory.getLogger(ConformanceConfig.class);
	private static final Set<String> TYPES = Set.of("CodeSystem", "ValueSet", "StructureDefinition");

	private final FhirContext fhirContext;
	private final DaoRegistry daoRegistry;
	private final RestfulServer server;
	private final IValidatorModule validatorModule;
	private final String directory;
	private final String packageFile;
	private final boolean validateRequests;

	public ConformanceConfig(
			FhirContext fhirContext,
			DaoRegistry daoRegistry,
			RestfulServer server,
			IValidatorModule validatorModule,
			@Value("${ims.conformance-dir:}") String directory,
			@Value("${ims.package:}") String packageFile,
			@Value("${ims.validate-requests:false}") boolean validateRequests) {
		this.fhirContext = fhirContext;
		this.daoRegistry = daoRegistry;
		this.server = server;
		this.validatorModule = validatorModule;
		this.directory = directory;
		this.packageFile = packageFile;
		this.validateRequests = validateRequests;
	}

	@Override
	public void onApplicationEvent(ApplicationReadyEvent event) {
		if (!directory.isBlank()) {
			load(Path.of(directory));
		}
		if (!packageFile.isBlank()) {
			loadPackage(Path.of(packageFile));
		}
		if (validateRequests) {
			RequestValidatingInterceptor interceptor = new RequestValidatingInterceptor();
			interceptor.addValidatorModule(validatorModule);
			interceptor.setFailOnSeverity(ResultSeverityEnum.ERROR);
			interceptor.setAddResponseHeaderOnSeverity(null);
			server.registerInterceptor(interceptor);
			LOG.info("validating incoming resources");
		}
		// The launcher (tests/hapi/run) waits for this line: the server is fully set up.
		System.out.println("IMS-FHIR-TEST-SERVER-READY");
		System.out.flush();
	}

	private void load(Path dir) {
		List<Path> files;
		try (Stream<Path> walk = Files.walk(dir)) {
			files = walk.filter(p -> p.toString().endsWith(".json")).sorted().toList();
		} catch (IOException e) {
			throw new IllegalStateException("cannot read " + dir, e);
		}
		int stored = 0;
		for (Path file : files) {
			try {
				stored += store(Files.readString(file, StandardCharsets.UTF_8));
			} catch (IOException e) {
				throw new IllegalStateException("cannot read " + file, e);
			}
		}
		LOG.info("stored {} conformance resources from {}", stored, dir);
	}

	/** A FHIR NPM package: a gzipped tar whose package/ folder holds the resources. */
	private void loadPackage(Path file) {
		int stored = 0;
		try (TarArchiveInputStream tar = new TarArchiveInputStream(
				new GzipCompressorInputStream(Files.newInputStream(file)))) {
			TarArchiveEntry entry;
			while ((entry = tar.getNextEntry()) != null) {
				String name = entry.getName();
				if (entry.isFile() && name.startsWith("package/") && name.endsWith(".json")
						&& !name.endsWith("package.json") && !name.endsWith(".index.json")) {
					stored += store(new String(tar.readAllBytes(), StandardCharsets.UTF_8));
				}
			}
		} catch (IOException e) {
			throw new IllegalStateException("cannot read package " + file, e);
		}
		LOG.info("installed {} conformance resources from package {}", stored, file);
	}

	@SuppressWarnings({"unchecked", "rawtypes"})
	private int store(String json) {
		IBaseResource resource;
		try {
			resource = fhirContext.newJsonParser().parseResource(json);
		} catch (Exception e) {
			return 0; // not a resource
		}
		String type = fhirContext.getResourceType(resource);
		if (!TYPES.contains(type)) {
			return 0;
		}
		IFhirResourceDao dao = daoRegistry.getResourceDao(type);
		dao.update(resource, new SystemRequestDetails());
		return 1;
	}
}
